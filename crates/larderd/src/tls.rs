//! TLS for the listener: a rustls server configuration from PEM files, offering HTTP/2 and
//! HTTP/1.1 through ALPN.

use crate::config::TlsFiles;
use anyhow::Context;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

pub fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect())
        .with_context(|| {
            format!(
                "cannot read a PEM certificate chain from {}",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", files.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("cannot read a PEM private key from {}", files.key.display()))?;
    // The provider is chosen explicitly: dependencies enable more than one rustls backend, and
    // the process-wide default is then ambiguous.
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .with_context(|| {
                format!(
                    "the key in {} does not fit the certificate in {}",
                    files.key.display(),
                    files.cert.display()
                )
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
