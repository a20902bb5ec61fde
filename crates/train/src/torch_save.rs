//! Writes a dict of tensors in PyTorch's own file format (what `torch.save(dict)` writes), so
//! `torch.load(path, weights_only=True)` reads it without any cpmv code.
//!
//! Why: the official LoRA recipe reloads the trained vision tower, resampler and embeddings
//! from `vpm_resampler_embedtokens.pt` with `torch.load`; safetensors would not do there.
//!
//! The format: an uncompressed ZIP archive whose entries share one top-level folder
//! (`<archive>/`): `data.pkl` (a protocol-2 pickle of the dict, each tensor a call of
//! `torch._utils._rebuild_tensor_v2` on a persistent storage reference), `byteorder`,
//! `data/<key>` (the raw little-endian bytes of each storage, 64-byte aligned so torch can
//! memory-map them), `version`, `.data/serialization_id`. ZIP64 records are written when an
//! entry or the archive passes 4 GiB (a full-size embedding plus vision tower does).

use std::io::Write;
use std::path::Path;

/// Element types the writer stores (the storage class torch rebuilds them with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageType {
    F32,
    Bf16,
    F16,
}

impl StorageType {
    fn class(self) -> &'static str {
        match self {
            StorageType::F32 => "FloatStorage",
            StorageType::Bf16 => "BFloat16Storage",
            StorageType::F16 => "HalfStorage",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageType::F32 => 4,
            StorageType::Bf16 | StorageType::F16 => 2,
        }
    }
}

/// One tensor to save: contiguous little-endian bytes of `shape` elements of `dtype`.
pub struct TorchTensor {
    pub name: String,
    pub dtype: StorageType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Alignment of storage data inside the archive (torch's own choice).
const ALIGN: u64 = 64;

/// Pickle protocol-2 opcodes used here.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const MARK: u8 = b'(';
    pub const BINUNICODE: u8 = b'X';
    pub const GLOBAL: u8 = b'c';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const TUPLE: u8 = b't';
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const REDUCE: u8 = b'R';
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn str(&mut self, s: &str) {
        self.0.push(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(op::GLOBAL);
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }

    fn int(&mut self, v: u64) {
        if let Ok(small) = i32::try_from(v) {
            self.0.push(op::BININT);
            self.0.extend_from_slice(&small.to_le_bytes());
        } else {
            // Two's complement little-endian, with a zero top byte so it stays positive.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] >= 0x80 {
                bytes.push(0);
            }
            self.0.push(op::LONG1);
            self.0.push(bytes.len() as u8);
            self.0.extend_from_slice(&bytes);
        }
    }

    fn int_tuple(&mut self, vals: &[u64]) {
        self.0.push(op::MARK);
        for &v in vals {
            self.int(v);
        }
        self.0.push(op::TUPLE);
    }
}

/// The pickle of `{name: tensor}` with storages `data/0`, `data/1`, ... in order.
fn pickle_dict(tensors: &[TorchTensor]) -> Vec<u8> {
    let mut p = Pickle(vec![op::PROTO, 2, op::EMPTY_DICT]);
    if !tensors.is_empty() {
        p.0.push(op::MARK);
        for (i, t) in tensors.iter().enumerate() {
            let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
            p.str(&t.name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.0.push(op::MARK);
            // Persistent id: ('storage', <storage class>, key, location, numel).
            p.0.push(op::MARK);
            p.str("storage");
            p.global("torch", t.dtype.class());
            p.str(&i.to_string());
            p.str("cpu");
            p.int(numel);
            p.0.push(op::TUPLE);
            p.0.push(op::BINPERSID);
            p.int(0); // storage offset
            let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            p.int_tuple(&shape);
            let mut stride = vec![1u64; shape.len()];
            for d in (0..shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * shape[d + 1];
            }
            p.int_tuple(&stride);
            p.0.push(op::NEWFALSE); // requires_grad
            p.global("collections", "OrderedDict");
            p.0.push(op::EMPTY_TUPLE);
            p.0.push(op::REDUCE); // backward hooks: OrderedDict()
            p.0.push(op::TUPLE);
            p.0.push(op::REDUCE);
        }
        p.0.push(op::SETITEMS);
    }
    p.0.push(op::STOP);
    p.0
}

/// A ZIP writer for stored (uncompressed) entries, with ZIP64 where needed.
struct Zip<W: Write> {
    out: W,
    offset: u64,
    central: Vec<u8>,
    entries: u64,
}

const ZIP64_LIMIT: u64 = 0xFFFF_FFFF;

impl<W: Write> Zip<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Adds one entry whose data starts at a multiple of `align` bytes.
    fn entry(&mut self, name: &str, data: &[u8], align: u64) -> std::io::Result<()> {
        let crc = crc32fast::hash(data);
        let size = data.len() as u64;
        let header_at = self.offset;
        let zip64 = size >= ZIP64_LIMIT || header_at >= ZIP64_LIMIT;
        // Local header: sizes in a ZIP64 extra field when they do not fit.
        let mut extra = Vec::new();
        if zip64 {
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
        }
        let fixed = 30 + name.len() as u64 + extra.len() as u64;
        let data_at = header_at + fixed;
        let pad = (align - (data_at + 4) % align) % align;
        if align > 1 {
            // A padding record (id "FB", as torch writes it) moves the data to the boundary.
            extra.extend_from_slice(b"FB");
            extra.extend_from_slice(&(pad as u16).to_le_bytes());
            extra.extend(std::iter::repeat_n(b'Z', pad as usize));
        }
        let small = |v: u64| if zip64 { ZIP64_LIMIT as u32 } else { v as u32 };
        let version: u16 = if zip64 { 45 } else { 20 };
        let mut h = Vec::with_capacity(30 + name.len() + extra.len());
        h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // flags
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&0u16.to_le_bytes()); // time
        h.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&small(size).to_le_bytes());
        h.extend_from_slice(&small(size).to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        self.put(&h)?;
        self.put(data)?;

        // Central directory record.
        let mut cextra = Vec::new();
        if zip64 {
            cextra.extend_from_slice(&1u16.to_le_bytes());
            cextra.extend_from_slice(&24u16.to_le_bytes());
            cextra.extend_from_slice(&size.to_le_bytes());
            cextra.extend_from_slice(&size.to_le_bytes());
            cextra.extend_from_slice(&header_at.to_le_bytes());
        }
        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&version.to_le_bytes()); // made by
        c.extend_from_slice(&version.to_le_bytes()); // needed
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0x21u16.to_le_bytes());
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&small(size).to_le_bytes());
        c.extend_from_slice(&small(size).to_le_bytes());
        c.extend_from_slice(&(name.len() as u16).to_le_bytes());
        c.extend_from_slice(&(cextra.len() as u16).to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // comment
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        c.extend_from_slice(&small(header_at).to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        c.extend_from_slice(&cextra);
        self.entries += 1;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<W> {
        let central_at = self.offset;
        let central = std::mem::take(&mut self.central);
        self.put(&central)?;
        let central_size = central.len() as u64;
        let end_at = self.offset;
        let zip64 = central_at >= ZIP64_LIMIT || self.entries >= 0xFFFF;
        if zip64 {
            let mut e = Vec::new();
            e.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            e.extend_from_slice(&44u64.to_le_bytes());
            e.extend_from_slice(&45u16.to_le_bytes());
            e.extend_from_slice(&45u16.to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
            e.extend_from_slice(&self.entries.to_le_bytes());
            e.extend_from_slice(&self.entries.to_le_bytes());
            e.extend_from_slice(&central_size.to_le_bytes());
            e.extend_from_slice(&central_at.to_le_bytes());
            // Locator.
            e.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
            e.extend_from_slice(&end_at.to_le_bytes());
            e.extend_from_slice(&1u32.to_le_bytes());
            self.put(&e)?;
        }
        let count = if zip64 { 0xFFFF } else { self.entries as u16 };
        let mut e = Vec::new();
        e.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(&count.to_le_bytes());
        e.extend_from_slice(&count.to_le_bytes());
        let small = |v: u64| if zip64 { ZIP64_LIMIT as u32 } else { v as u32 };
        e.extend_from_slice(&small(central_size).to_le_bytes());
        e.extend_from_slice(&small(central_at).to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        self.put(&e)?;
        Ok(self.out)
    }
}

/// Writes `tensors` as `torch.save({name: tensor, ...})` would, to `path`. `archive` is the
/// top-level folder name inside the file (torch uses the file's stem).
pub fn write(path: &Path, archive: &str, tensors: &[TorchTensor]) -> std::io::Result<()> {
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        if t.bytes.len() != numel * t.dtype.size() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "tensor `{}`: {} bytes for shape {:?} of {:?}",
                    t.name,
                    t.bytes.len(),
                    t.shape,
                    t.dtype
                ),
            ));
        }
    }
    let file = std::fs::File::create(path)?;
    let mut zip = Zip {
        out: std::io::BufWriter::with_capacity(1 << 20, file),
        offset: 0,
        central: Vec::new(),
        entries: 0,
    };
    let pickle = pickle_dict(tensors);
    zip.entry(&format!("{archive}/data.pkl"), &pickle, ALIGN)?;
    zip.entry(&format!("{archive}/.format_version"), b"1", ALIGN)?;
    zip.entry(&format!("{archive}/.storage_alignment"), b"64", ALIGN)?;
    zip.entry(&format!("{archive}/byteorder"), b"little", ALIGN)?;
    for (i, t) in tensors.iter().enumerate() {
        zip.entry(&format!("{archive}/data/{i}"), &t.bytes, ALIGN)?;
    }
    zip.entry(&format!("{archive}/version"), b"3\n", ALIGN)?;
    // torch writes a random id here; a digest of the content keeps our files reproducible.
    let id = format!("{:020}", crc32fast::hash(&pickle) as u64);
    zip.entry(
        &format!("{archive}/.data/serialization_id"),
        id.as_bytes(),
        ALIGN,
    )?;
    let mut out = zip.finish()?;
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pickle's integers: small ones as BININT, large ones as LONG1 that stays positive.
    #[test]
    fn ints_encode_as_pickle_does() {
        let mut p = Pickle(Vec::new());
        p.int(7);
        assert_eq!(p.0, [op::BININT, 7, 0, 0, 0]);
        let mut p = Pickle(Vec::new());
        p.int(1 << 31);
        assert_eq!(p.0, [op::LONG1, 5, 0, 0, 0, 0x80, 0]);
        let mut p = Pickle(Vec::new());
        p.int(5_000_000_000);
        assert_eq!(p.0[..2], [op::LONG1, 5]);
    }

    /// Every storage starts on a 64-byte boundary and the ZIP directory points at the headers.
    #[test]
    fn storages_are_aligned_and_the_directory_is_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pt");
        let tensors = vec![
            TorchTensor {
                name: "a.weight".into(),
                dtype: StorageType::F32,
                shape: vec![2, 3],
                bytes: (0..24u8).collect(),
            },
            TorchTensor {
                name: "b".into(),
                dtype: StorageType::Bf16,
                shape: vec![5],
                bytes: vec![1; 10],
            },
        ];
        write(&path, "t", &tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // End of central directory: 8 entries, central directory inside the file.
        let end = bytes.len() - 22;
        assert_eq!(bytes[end..end + 4], 0x0605_4b50u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([bytes[end + 10], bytes[end + 11]]), 8);
        let at = u32::from_le_bytes(bytes[end + 16..end + 20].try_into().unwrap()) as usize;
        let mut pos = at;
        let mut seen = 0;
        while pos < end {
            assert_eq!(bytes[pos..pos + 4], 0x0201_4b50u32.to_le_bytes());
            let n = u16::from_le_bytes([bytes[pos + 28], bytes[pos + 29]]) as usize;
            let x = u16::from_le_bytes([bytes[pos + 30], bytes[pos + 31]]) as usize;
            let local = u32::from_le_bytes(bytes[pos + 42..pos + 46].try_into().unwrap()) as usize;
            let name = std::str::from_utf8(&bytes[pos + 46..pos + 46 + n]).unwrap();
            let ln = u16::from_le_bytes([bytes[local + 26], bytes[local + 27]]) as usize;
            let lx = u16::from_le_bytes([bytes[local + 28], bytes[local + 29]]) as usize;
            let data = local + 30 + ln + lx;
            assert_eq!(data % 64, 0, "{name}");
            let size = u32::from_le_bytes(bytes[pos + 20..pos + 24].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[pos + 16..pos + 20].try_into().unwrap());
            assert_eq!(crc32fast::hash(&bytes[data..data + size]), crc, "{name}");
            if name == "t/data/0" {
                assert_eq!(&bytes[data..data + size], &tensors[0].bytes[..]);
            }
            pos += 46 + n + x;
            seen += 1;
        }
        assert_eq!(seen, 8);
    }

    #[test]
    fn a_size_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = TorchTensor {
            name: "x".into(),
            dtype: StorageType::F16,
            shape: vec![3],
            bytes: vec![0; 4],
        };
        let e = write(&dir.path().join("x.pt"), "x", &[t]).unwrap_err();
        assert!(e.to_string().contains("`x`"), "{e}");
    }
}
