#![warn(missing_docs)]

//! Protocol pieces shared by the `larderd` server and the `larder` client.
//!
//! Everything here is pure: parsing and validating namespaces and keys, strong content-digest
//! ETags, `Range` / `If-*` header values, human units (`50GiB`, `7d`), and the one function that
//! decides every conditional and range outcome of a read (200/206/304/412/416/404) or a write.
//! Keeping it free of I/O means the server, every tier and the client agree on the exact same
//! rules, and the rules can be tested exhaustively in a table.

pub mod decide;
pub mod etag;
pub mod name;
pub mod range;
pub mod units;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod rfc_reference;

pub use decide::{
    ReadConditions, ReadOutcome, Validators, WriteOutcome, WritePrecondition, decide_read,
    decide_write,
};
pub use etag::{ETag, EntityTag, TagList};
pub use name::{Key, NameError, Namespace};
pub use range::{ByteRange, RangeSpec};
