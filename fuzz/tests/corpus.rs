//! Replays the committed corpora (`corpus/<target>/`) through the fuzz targets' bodies
//! on the stable toolchain: every input that libFuzzer once kept (and every crash that
//! was fixed, added to the corpus as a regression) must still run without a panic.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).expect("read corpus file");
        let name = path.display().to_string();
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            panic!("{target} panicked on {name}");
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
    eprintln!("{target}: {n} inputs replayed");
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", ssm_wire_fuzz::frame_decode);
}

#[test]
fn smux_feed_corpus() {
    replay("smux_feed", ssm_wire_fuzz::smux_feed);
}

#[test]
fn channel_receive_corpus() {
    replay("channel_receive", ssm_wire_fuzz::channel_receive);
}
