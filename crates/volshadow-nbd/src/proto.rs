//! NBD protocol constants and the parsers of what a client sends.
//! Numbers from the NBD protocol specification (fixed newstyle).
//!
//! The parsers take untrusted bytes and never panic; `fuzz/` drives them.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 2;
pub const TFLAG_SEND_FLUSH: u16 = 4;
pub const TFLAG_SEND_FUA: u16 = 8;
pub const TFLAG_SEND_TRIM: u16 = 32;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
pub const TFLAG_CAN_MULTI_CONN: u16 = 256;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_REQ_ONE: u16 = 8;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `volshadow:changed`: the extent changed.
pub const STATE_CHANGED: u32 = 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// Largest READ / WRITE payload accepted (and advertised).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
pub const MAX_OPTION: u32 = 64 << 10;

pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const CONTEXT_CHANGED: &str = "volshadow:changed";

/// A transmission-phase request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why bytes were not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    WrongMagic(u32),
    Short,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Request {
    pub const LEN: usize = 28;

    pub fn parse(b: &[u8]) -> Result<Request, ParseError> {
        let magic = u32_at(b, 0).ok_or(ParseError::Short)?;
        if magic != REQUEST_MAGIC {
            return Err(ParseError::WrongMagic(magic));
        }
        Ok(Request {
            flags: u16_at(b, 4).ok_or(ParseError::Short)?,
            kind: u16_at(b, 6).ok_or(ParseError::Short)?,
            cookie: u64_at(b, 8).ok_or(ParseError::Short)?,
            offset: u64_at(b, 16).ok_or(ParseError::Short)?,
            length: u32_at(b, 24).ok_or(ParseError::Short)?,
        })
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// Parses an INFO / GO payload; `None` if malformed.
pub fn parse_info(b: &[u8]) -> Option<InfoRequest> {
    let n = u32_at(b, 0)? as usize;
    let name = b.get(4..4usize.checked_add(n)?)?;
    let name = String::from_utf8(name.to_vec()).ok()?;
    let at = 4 + n;
    let count = u16_at(b, at)? as usize;
    if b.len() != at + 2 + 2 * count {
        return None;
    }
    let infos = (0..count)
        .map(|i| u16_at(b, at + 2 + 2 * i))
        .collect::<Option<_>>()?;
    Some(InfoRequest { name, infos })
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Parses a meta-context payload; `None` if malformed.
pub fn parse_meta(b: &[u8]) -> Option<MetaRequest> {
    let n = u32_at(b, 0)? as usize;
    let export = String::from_utf8(b.get(4..4usize.checked_add(n)?)?.to_vec()).ok()?;
    let mut at = 4 + n;
    let count = u32_at(b, at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = u32_at(b, at)? as usize;
        at += 4;
        let q = b.get(at..at.checked_add(len)?)?;
        queries.push(String::from_utf8(q.to_vec()).ok()?);
        at += len;
    }
    (at == b.len()).then_some(MetaRequest { export, queries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&512u32.to_be_bytes());
        let r = Request::parse(&b).unwrap();
        assert_eq!(
            (r.flags, r.kind, r.cookie, r.offset, r.length),
            (1, 1, 7, 4096, 512)
        );
        assert_eq!(Request::parse(&b[..27]), Err(ParseError::Short));
        b[0] = 0;
        assert!(matches!(Request::parse(&b), Err(ParseError::WrongMagic(_))));
    }

    #[test]
    fn info_and_meta_payloads() {
        let mut b = 4u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"live");
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info(&b),
            Some(InfoRequest {
                name: "live".into(),
                infos: vec![3]
            })
        );
        assert_eq!(parse_info(&b[..b.len() - 1]), None);
        assert_eq!(parse_info(&u32::MAX.to_be_bytes()), None);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta(&m),
            Some(MetaRequest {
                export: String::new(),
                queries: vec!["base:allocation".into()]
            })
        );
        m.push(0);
        assert_eq!(parse_meta(&m), None);
    }
}
