//! TLS for the simulator's listener: a throwaway CA and a server certificate for
//! `127.0.0.1`, `::1` and `localhost`, generated per simulator with rcgen.
//!
//! The CA is written as PEM to a private temporary directory so that a client can trust
//! it through `AWS_CA_BUNDLE` (the plugin, the AWS CLI) or a rustls root store (tests).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::SimError;

/// Generated key material, and the temporary directory holding the CA PEM.
pub(crate) struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    pub ca_pem: String,
    pub ca_pem_path: PathBuf,
    dir: PathBuf,
}

impl Drop for TlsMaterial {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_err(e: impl std::fmt::Display) -> SimError {
    SimError::Tls(e.to_string())
}

impl TlsMaterial {
    /// Generates a CA and a leaf certificate, writes the CA PEM under `std::env::temp_dir()`.
    pub(crate) fn generate(unique: u64) -> Result<TlsMaterial, SimError> {
        let ca_key = KeyPair::generate().map_err(tls_err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ssm-sim test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls_err)?;

        let leaf_key = KeyPair::generate().map_err(tls_err)?;
        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            crate::EICE_TEST_HOST.to_owned(),
        ])
        .map_err(tls_err)?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "ssm-sim");
        leaf_params.is_ca = IsCa::NoCa;
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .map_err(tls_err)?;

        let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(tls_err)?;
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let ca_pem = ca_cert.pem();
        let dir = std::env::temp_dir().join(format!("ssm-sim-{}-{:x}", std::process::id(), unique));
        std::fs::create_dir_all(&dir).map_err(SimError::Io)?;
        let ca_pem_path = dir.join("ca.pem");
        std::fs::write(&ca_pem_path, &ca_pem).map_err(SimError::Io)?;
        Ok(TlsMaterial {
            server_config: Arc::new(server_config),
            ca_pem,
            ca_pem_path,
            dir,
        })
    }

    pub(crate) fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// The CA certificate in DER, for a client root store.
    pub(crate) fn ca_der(&self) -> Option<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.ca_pem.as_bytes())
            .next()
            .and_then(Result::ok)
    }
}
