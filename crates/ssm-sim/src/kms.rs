//! The simulated KMS: `GenerateDataKey` hands out random data keys with an opaque
//! CiphertextBlob that the simulated agent maps back to the key (standing in for the
//! agent's own `kms:Decrypt` call).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use rand::RngCore;

use crate::session::lock;

/// Prefix of every CiphertextBlob the simulator issues.
const BLOB_PREFIX: &[u8] = b"ssm-sim/kms/v1/";

/// One recorded `GenerateDataKey` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsRequest {
    pub key_id: String,
    pub number_of_bytes: u32,
    pub encryption_context: BTreeMap<String, String>,
    /// The CiphertextBlob returned (raw bytes, before base64).
    pub ciphertext_blob: Vec<u8>,
}

#[derive(Default)]
pub(crate) struct KmsStore {
    keys: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    requests: Mutex<Vec<KmsRequest>>,
}

impl KmsStore {
    /// Creates a data key of `n` bytes; returns (plaintext, blob).
    pub(crate) fn generate(
        &self,
        key_id: &str,
        n: u32,
        context: BTreeMap<String, String>,
        rng: &mut impl RngCore,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut plaintext = vec![0u8; n as usize];
        rng.fill_bytes(&mut plaintext);
        let mut id = [0u8; 24];
        rng.fill_bytes(&mut id);
        let mut blob = BLOB_PREFIX.to_vec();
        blob.extend_from_slice(&id);
        lock(&self.keys).insert(blob.clone(), plaintext.clone());
        lock(&self.requests).push(KmsRequest {
            key_id: key_id.to_owned(),
            number_of_bytes: n,
            encryption_context: context,
            ciphertext_blob: blob.clone(),
        });
        (plaintext, blob)
    }

    /// The plaintext key for a blob this store issued.
    pub(crate) fn decrypt(&self, blob: &[u8]) -> Option<Vec<u8>> {
        lock(&self.keys).get(blob).cloned()
    }

    pub(crate) fn requests(&self) -> Vec<KmsRequest> {
        lock(&self.requests).clone()
    }
}
