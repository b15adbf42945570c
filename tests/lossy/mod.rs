//! The real broker on a lossy file system (`halfmq-lossyfs`): the mount, the broker on it,
//! power cuts, and starting a broker that may refuse to open. Shared by `tests/powerloss.rs`
//! and `tests/lossy_damage.rs`.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

use halfmq_lossyfs::{CutReport, LossyDisk, Mounted, Tear};

use crate::common::{fast_check_back, BrokerProc};

pub use crate::common::load::{body_of, runtime};

/// Settings that make every kind of file busy in a short run: segments of 1 MiB (rolls and
/// preallocation; records up to 64 KiB), a checkpoint every 64 KiB of log, small key-index
/// files (rollover), and check-back in fractions of a second that never gives up within a
/// test.
pub fn broker_args() -> Vec<&'static str> {
    let mut args = vec![
        "--segment-bytes",
        "1048576",
        "--record-bytes-max",
        "65536",
        "--checkpoint-bytes",
        "65536",
        "--key-index-slots",
        "64",
        "--key-index-entries",
        "512",
    ];
    args.extend(fast_check_back("10000"));
    args
}

/// A lossy disk, mounted, with the broker's data directory on it. Fields drop in order:
/// the broker is killed before the file system under it is unmounted.
pub struct Rig {
    pub broker: Option<BrokerProc>,
    pub mount: Option<Mounted>,
    pub disk: LossyDisk,
    pub mnt: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Rig {
    /// A fresh disk, mounted, with an empty data directory that is durable (as one an
    /// operator created long ago). A mount failure fails the test with the reason.
    pub fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let disk = LossyDisk::new(&tmp.path().join("disk")).unwrap();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut rig = Rig {
            broker: None,
            mount: None,
            disk,
            mnt,
            _tmp: tmp,
        };
        rig.mount();
        std::fs::create_dir(rig.data_dir()).unwrap();
        std::fs::File::open(&rig.mnt).unwrap().sync_all().unwrap();
        rig
    }

    fn mount(&mut self) {
        let m = self.disk.mount(&self.mnt).unwrap_or_else(|e| {
            panic!("the power-loss tests need a FUSE mount, and it failed: {e}")
        });
        self.mount = Some(m);
    }

    /// The broker's data directory, on the mount.
    pub fn data_dir(&self) -> PathBuf {
        self.mnt.join("data")
    }

    /// The data directory as it is durably (valid while nothing is mounted).
    pub fn durable_data_dir(&self) -> PathBuf {
        self.disk.durable_dir().join("data")
    }

    /// Start the broker on the mount with [`broker_args`]; it must start.
    pub fn start(&mut self) -> &BrokerProc {
        assert!(self.broker.is_none(), "a broker is running");
        self.broker = Some(BrokerProc::start(&self.data_dir(), &broker_args()));
        self.broker.as_ref().unwrap()
    }

    /// The running broker's address.
    pub fn addr(&self) -> String {
        self.broker.as_ref().expect("a running broker").addr.clone()
    }

    /// Power loss: `kill -9` of the broker, then the file system drops everything not made
    /// durable (see [`Tear`]), and is mounted again. Returns what was dropped and the
    /// killed broker's stderr.
    pub fn power_cut(&mut self, tear: Tear) -> (CutReport, String) {
        let mut b = self.broker.take().expect("a running broker");
        b.kill9();
        let stderr = b.stderr();
        let report = self
            .mount
            .take()
            .expect("mounted")
            .power_cut(tear)
            .unwrap_or_else(|e| panic!("power cut: {e}"));
        self.mount();
        (report, stderr)
    }

    /// SIGTERM (the broker must stop cleanly), then a clean unmount that writes back
    /// everything, as a clean shutdown of the machine would. Nothing is mounted after.
    pub fn shut_down(&mut self) {
        if let Some(mut b) = self.broker.take() {
            b.terminate();
        }
        self.mount
            .take()
            .expect("mounted")
            .unmount_clean()
            .unwrap_or_else(|e| panic!("clean unmount: {e}"));
    }

    /// Mount again after [`Rig::shut_down`].
    pub fn remount(&mut self) {
        assert!(self.mount.is_none(), "already mounted");
        self.mount();
    }

    /// Start the broker on the mount: `Ok` once it listens, `Err(stderr)` if it exits
    /// first (with the exit status checked to be a failure).
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(self.broker.is_none(), "a broker is running");
        self.broker = Some(BrokerProc::try_start(&self.data_dir(), &broker_args())?);
        Ok(())
    }
}
