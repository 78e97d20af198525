//! Where a volume's shadow storage is: a small JSON file beside the image,
//! `IMG.vshadow`, naming the diff area relative to itself (so moving both
//! files together keeps them paired) and the volume id recorded in it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use volshadow_block::{BlockDevice, FileImage, OpenOptions, open_device};
use volshadow_cow::Volume;

#[derive(Debug, Serialize, Deserialize)]
pub struct Binding {
    pub version: u32,
    /// The diff area, relative to the binding file's directory.
    pub diff: PathBuf,
    pub volume_id: Uuid,
}

/// `IMG.vshadow`.
pub fn binding_path(img: &Path) -> PathBuf {
    let mut s = img.as_os_str().to_owned();
    s.push(".vshadow");
    PathBuf::from(s)
}

/// `IMG.vshadow.sock`: the control socket of a running `serve`.
pub fn control_path(img: &Path) -> PathBuf {
    let mut s = img.as_os_str().to_owned();
    s.push(".vshadow.sock");
    PathBuf::from(s)
}

pub fn read_binding(img: &Path) -> Result<(Binding, PathBuf)> {
    let path = binding_path(img);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no shadow storage (no {}); run `volshadow add shadowstorage --for {} --on DIFF --maxsize SIZE`",
            img.display(),
            path.display(),
            img.display()
        )
    })?;
    let b: Binding = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid shadow-storage binding", path.display()))?;
    if b.version != 1 {
        bail!(
            "{}: binding version {} is not supported",
            path.display(),
            b.version
        );
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let diff = dir.join(&b.diff);
    Ok((b, diff))
}

pub fn write_binding(img: &Path, diff: &Path, volume_id: Uuid) -> Result<()> {
    let path = binding_path(img);
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir_abs = std::fs::canonicalize(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?;
    let diff_abs = std::fs::canonicalize(diff)?;
    let rel = diff_abs
        .strip_prefix(&dir_abs)
        .map(Path::to_path_buf)
        .unwrap_or(diff_abs);
    let b = Binding {
        version: 1,
        diff: rel,
        volume_id,
    };
    std::fs::write(&path, serde_json::to_string_pretty(&b)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Opens the origin and its diff area (running recovery).
pub fn open_volume(img: &Path) -> Result<Volume> {
    let (binding, diff_path) = read_binding(img)?;
    let origin: Arc<dyn BlockDevice> = Arc::from(open_device(img, &OpenOptions::new())?);
    let diff: Arc<dyn BlockDevice> = Arc::new(
        FileImage::open(&diff_path)
            .with_context(|| format!("opening shadow storage {}", diff_path.display()))?,
    );
    let vol = Volume::open(origin, diff)?;
    if vol.id() != binding.volume_id {
        bail!(
            "{} holds volume {}, but {} expects {}",
            diff_path.display(),
            vol.id(),
            binding_path(img).display(),
            binding.volume_id
        );
    }
    Ok(vol)
}

/// Parses sizes like `64M`, `16K`, `1G`, `2T` or plain bytes; `0` and
/// `0K` are both zero (callers that need a positive size use
/// [`parse_positive_size`]). Never panics: overflow is an error.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix {c:?} in {s:?} (use K, M, G, T)"
                    ));
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a size (e.g. 64M)"));
    }
    // All digits: a parse failure can only be overflow.
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("size {s:?} is too large (at most {} bytes)", u64::MAX))
}

/// [`parse_size`] for sizes that must not be zero.
pub fn parse_positive_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("size {:?} must be more than zero", s.trim())),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("16k"), Ok(16 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("0K"), Ok(0));
        assert!(parse_positive_size("0K").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1K").is_err());
        assert!(parse_size("+1").is_err());
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("99999999999999999999999K")
                .unwrap_err()
                .contains("too large")
        );
    }
}
