//! A volume that `serve` or `mount` holds, as the copy-on-write provider
//! drives it: every step goes through the server's control socket, and a
//! set's steps through one conversation ([`RemoteMember`]), so a backup
//! takes a volume whose clients keep writing.

use std::path::{Path, PathBuf};

use uuid::Uuid;
use volshadow_block::{BlockDevice, Op};
use volshadow_cow::SetMember;
use volshadow_vss::{CowVolume, ProviderError, ProviderResult};

use crate::member::RemoteMember;
use crate::ops::{MAX_PIECE, Reply, Request, ShadowRow, Which};

/// The served volume at `img`.
#[derive(Debug)]
pub struct ServedVolume {
    img: PathBuf,
}

impl ServedVolume {
    /// `None` when no server holds `img`.
    pub fn find(img: &Path) -> anyhow::Result<Option<Self>> {
        Ok(
            crate::control::call(img, &Request::Size, &[])?.map(|_| ServedVolume {
                img: img.to_path_buf(),
            }),
        )
    }

    fn call(&self, req: &Request, payload: &[u8]) -> ProviderResult<(Reply, Vec<u8>)> {
        let failed = |e: anyhow::Error| {
            ProviderError(format!(
                "{} (served): {}",
                self.img.display(),
                crate::one_line(&e)
            ))
        };
        match crate::control::call(&self.img, req, payload).map_err(failed)? {
            Some(answer) => answer.result.map_err(failed),
            None => Err(ProviderError(format!(
                "{}: its server went away",
                self.img.display()
            ))),
        }
    }

    fn rows(&self) -> ProviderResult<Vec<ShadowRow>> {
        match self.call(&Request::ListShadows, &[])?.0 {
            Reply::Shadows { shadows } => Ok(shadows),
            other => Err(ProviderError(format!("unexpected answer {other:?}"))),
        }
    }
}

impl CowVolume for ServedVolume {
    fn member(&self) -> volshadow_cow::Result<Box<dyn SetMember + '_>> {
        match RemoteMember::join(&self.img) {
            Ok(Some(m)) => Ok(Box::new(m)),
            Ok(None) => Err(volshadow_cow::Error::SetMember {
                volume: Uuid::nil(),
                reason: format!("{}: no server holds it any more", self.img.display()),
            }),
            Err(e) => Err(volshadow_cow::Error::SetMember {
                volume: Uuid::nil(),
                reason: format!("{}: {}", self.img.display(), crate::one_line(&e)),
            }),
        }
    }

    fn flush(&self) -> ProviderResult {
        self.call(&Request::Flush, &[]).map(|_| ())
    }

    fn snapshots(&self) -> ProviderResult<Vec<(Uuid, Option<Uuid>)>> {
        Ok(self.rows()?.into_iter().map(|s| (s.id, s.set_id)).collect())
    }

    fn delete_snapshot(&self, id: Uuid) -> ProviderResult {
        let which = Which::Id(id.to_string());
        self.call(&Request::DeleteShadows { which }, &[])
            .map(|_| ())
    }

    fn revert(&self, id: Uuid) -> ProviderResult {
        let shadow = id.to_string();
        self.call(&Request::Revert { shadow }, &[]).map(|_| ())
    }

    fn open(&self, id: Uuid) -> ProviderResult<Box<dyn BlockDevice>> {
        let len = match self.call(&Request::Size, &[])?.0 {
            Reply::Size { bytes } => bytes,
            other => return Err(ProviderError(format!("unexpected answer {other:?}"))),
        };
        Ok(Box::new(ServedSnapshot {
            img: self.img.clone(),
            id,
            len,
        }))
    }
}

/// A served volume's snapshot, read a piece at a time through the server.
#[derive(Debug)]
struct ServedSnapshot {
    img: PathBuf,
    id: Uuid,
    len: u64,
}

impl ServedSnapshot {
    fn failed(&self, op: Op, offset: u64, e: impl std::fmt::Display) -> volshadow_block::Error {
        volshadow_block::Error::Layer {
            device: self.name(),
            kind: std::io::ErrorKind::Other,
            source: format!("{op:?} at {offset}: {e}").into(),
        }
    }
}

impl BlockDevice for ServedSnapshot {
    fn len(&self) -> u64 {
        self.len
    }

    fn block_size(&self) -> u32 {
        512
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> volshadow_block::Result<()> {
        volshadow_block::check_range(self, Op::Read, offset, buf.len() as u64)?;
        for (i, piece) in buf.chunks_mut(MAX_PIECE as usize).enumerate() {
            let at = offset + (i as u64) * MAX_PIECE;
            let req = Request::Read {
                shadow: Some(self.id.to_string()),
                offset: at,
                length: piece.len() as u64,
            };
            let answer = crate::control::call(&self.img, &req, &[])
                .map_err(|e| self.failed(Op::Read, at, crate::one_line(&e)))?
                .ok_or_else(|| self.failed(Op::Read, at, "its server went away"))?;
            let (_, data) = answer
                .result
                .map_err(|e| self.failed(Op::Read, at, crate::one_line(&e)))?;
            if data.len() != piece.len() {
                return Err(self.failed(Op::Read, at, "short read"));
            }
            piece.copy_from_slice(&data);
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> volshadow_block::Result<()> {
        Err(volshadow_block::Error::ReadOnly {
            device: self.name(),
        })
    }

    fn flush(&self) -> volshadow_block::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> volshadow_block::Result<()> {
        Err(volshadow_block::Error::ReadOnly {
            device: self.name(),
        })
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn name(&self) -> String {
        format!("snapshot {} of {} (served)", self.id, self.img.display())
    }
}
