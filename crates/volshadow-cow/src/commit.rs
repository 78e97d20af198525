//! Group commit: concurrent first writes after a persistent snapshot share
//! one diff-area flush.
//!
//! Each waiter sends a reply channel to the committer thread *after* its
//! records and data are written. The committer takes one request, drains
//! whatever else is queued, flushes once and answers them all; a flush that
//! starts after a request was received covers that request's writes.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use volshadow_block::BlockDevice;

type Reply = Result<(), (io::ErrorKind, String)>;

#[derive(Debug)]
pub(crate) struct GroupCommit {
    tx: Option<Sender<Sender<Reply>>>,
    thread: Option<JoinHandle<()>>,
    flushes: Arc<AtomicU64>,
    name: String,
}

impl GroupCommit {
    pub(crate) fn new(diff: Arc<dyn BlockDevice>) -> io::Result<Self> {
        let (tx, rx) = unbounded::<Sender<Reply>>();
        let flushes = Arc::new(AtomicU64::new(0));
        let counter = flushes.clone();
        let name = diff.name();
        let thread = std::thread::Builder::new()
            .name("volshadow-commit".into())
            .spawn(move || committer(&*diff, &rx, &counter))?;
        Ok(GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
            flushes,
            name,
        })
    }

    /// Returns once a flush that started after this call has completed.
    pub(crate) fn flush(&self) -> volshadow_block::Result<()> {
        let (reply_tx, reply_rx) = bounded(1);
        let sent = self.tx.as_ref().map(|tx| tx.send(reply_tx));
        let reply = match sent {
            Some(Ok(())) => reply_rx.recv().ok(),
            _ => None,
        };
        match reply {
            Some(Ok(())) => Ok(()),
            Some(Err((kind, msg))) => Err(volshadow_block::Error::Layer {
                device: self.name.clone(),
                kind,
                source: msg.into(),
            }),
            None => Err(volshadow_block::Error::Layer {
                device: self.name.clone(),
                kind: io::ErrorKind::BrokenPipe,
                source: "the commit thread has stopped".into(),
            }),
        }
    }

    /// Flushes issued by the committer so far.
    pub(crate) fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

fn committer(diff: &dyn BlockDevice, rx: &Receiver<Sender<Reply>>, flushes: &AtomicU64) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        let result = diff.flush().map_err(|e| (e.kind(), e.to_string()));
        flushes.fetch_add(1, Ordering::Relaxed);
        for w in waiters {
            // A waiter that gave up is fine to ignore.
            let _ = w.send(result.clone());
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
