//! The system's trusted root certificates, loaded once per process and only when a TLS
//! connection needs them (the data channel and the AWS API clients share them).
//!
//! Where the platform keeps one PEM bundle (Debian, Ubuntu, RHEL, Fedora, Amazon Linux,
//! Alpine, SUSE, the BSDs), only that file is read: rustls-native-certs would also read
//! every file of `/etc/ssl/certs`, the same certificates again, a few hundred files at
//! every start. `SSL_CERT_FILE` / `SSL_CERT_DIR` (the OpenSSL convention), macOS,
//! Windows and systems with no known bundle go through rustls-native-certs, as before.

use std::sync::OnceLock;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// PEM bundles, in the order OpenSSL's probing finds them on the usual distributions.
#[cfg(all(unix, not(target_os = "macos")))]
const BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/share/certs/ca-root-nss.crt",
];

/// The loaded roots.
pub struct SystemRoots {
    /// DER certificates, for rustls.
    pub certs: Vec<CertificateDer<'static>>,
    /// The same as one PEM bundle, for the AWS SDK's HTTP client.
    pub pem: Vec<u8>,
    /// Where they came from, for the log.
    pub source: String,
}

/// The system roots (loaded on first call).
pub fn system() -> &'static SystemRoots {
    static ROOTS: OnceLock<SystemRoots> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let roots = load(|k| std::env::var_os(k).is_some());
        tracing::debug!(
            "{} trusted root certificates from {}",
            roots.certs.len(),
            roots.source
        );
        roots
    })
}

fn load(env_set: impl Fn(&str) -> bool) -> SystemRoots {
    let overridden = env_set("SSL_CERT_FILE") || env_set("SSL_CERT_DIR");
    #[cfg(all(unix, not(target_os = "macos")))]
    if !overridden {
        for path in BUNDLES {
            if let Some(roots) = from_bundle(path) {
                return roots;
            }
        }
    }
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("loading system roots: {e}");
    }
    let source = if overridden {
        "SSL_CERT_FILE / SSL_CERT_DIR".to_owned()
    } else {
        "the platform store".to_owned()
    };
    SystemRoots {
        pem: to_pem(&native.certs),
        certs: native.certs,
        source,
    }
}

/// The certificates of one PEM bundle; `None` when the file is missing, unreadable or
/// holds none. (Only the unix bundle probing calls it outside the tests.)
#[cfg_attr(not(all(unix, not(target_os = "macos"))), allow(dead_code))]
pub fn from_bundle(path: &str) -> Option<SystemRoots> {
    let pem = std::fs::read(path).ok()?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return None;
    }
    Some(SystemRoots {
        certs,
        pem,
        source: path.to_owned(),
    })
}

/// DER certificates as a PEM bundle.
fn to_pem(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    for c in certs {
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let text = b64.encode(c.as_ref());
        for line in text.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let certs = vec![
            CertificateDer::from(vec![0x30u8, 0x03, 0x02, 0x01, 0x07]),
            CertificateDer::from((0..200u8).collect::<Vec<u8>>()),
        ];
        let pem = to_pem(&certs);
        let back: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, certs);
    }

    #[test]
    fn bundle_is_read_alone() {
        let dir = std::env::temp_dir().join(format!("smp-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bundle.pem");
        let certs = vec![CertificateDer::from(vec![1u8, 2, 3, 4, 5, 6])];
        std::fs::write(&path, to_pem(&certs)).unwrap();
        let roots = from_bundle(path.to_str().unwrap()).unwrap();
        assert_eq!(roots.certs, certs);
        assert_eq!(roots.source, path.to_str().unwrap());
        std::fs::write(&path, b"not a certificate\n").unwrap();
        assert!(from_bundle(path.to_str().unwrap()).is_none());
        assert!(from_bundle(dir.join("missing.pem").to_str().unwrap()).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// On this machine the system bundle exists and has real roots.
    #[cfg(target_os = "linux")]
    #[test]
    fn system_roots_load_from_a_bundle() {
        let roots = load(|_| false);
        assert!(roots.certs.len() > 20, "{} roots", roots.certs.len());
        assert!(BUNDLES.contains(&roots.source.as_str()), "{}", roots.source);
    }
}
