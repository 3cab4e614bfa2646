//! Compressed clusters: raw deflate (QEMU's "zlib", 4 KiB window) and zstd.

use crate::error::{Error, Result};
use crate::header::CompressionType;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Compresses one cluster. Returns `None` when the result would not be smaller than
/// `cluster.len() - 1` bytes (the caller then writes the cluster uncompressed, as QEMU does).
pub fn compress(ty: CompressionType, cluster: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = cluster.len() - 1;
    match ty {
        CompressionType::Zlib => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; limit];
            match c.compress(cluster, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Ok(Some(out))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(Error::Compression(e.to_string())),
            }
        }
        CompressionType::Zstd => {
            let out =
                zstd::bulk::compress(cluster, 0).map_err(|e| Error::Compression(e.to_string()))?;
            if out.len() >= limit {
                Ok(None)
            } else {
                Ok(Some(out))
            }
        }
    }
}

/// Decompresses `input` into exactly `out.len()` bytes.
pub fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match ty {
        CompressionType::Zlib => {
            let mut d = Decompress::new(false);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(Error::Compression(format!(
                    "compressed cluster decompressed to {} bytes instead of {}",
                    d.total_out(),
                    out.len()
                ))),
                Err(e) => Err(Error::Compression(e.to_string())),
            }
        }
        CompressionType::Zstd => {
            // QEMU accepts a sequence of frames; the compressed area may carry trailing
            // padding up to the sector boundary, which the streaming decoder ignores once the
            // output is full.
            let mut dec =
                zstd::stream::raw::Decoder::new().map_err(|e| Error::Compression(e.to_string()))?;
            use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before = (inb.pos(), outb.pos());
                dec.run(&mut inb, &mut outb)
                    .map_err(|e| Error::Compression(e.to_string()))?;
                if outb.pos() == outb.as_slice().len() || outb.pos() == outb.capacity() {
                    break;
                }
                if (inb.pos(), outb.pos()) == before || inb.pos() == input.len() {
                    break;
                }
            }
            let n = outb.pos();
            if n != out.len() {
                return Err(Error::Compression(format!(
                    "compressed cluster decompressed to {n} bytes instead of {}",
                    out.len()
                )));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(ty, &data).unwrap().expect("compressible");
            let mut padded = c.clone();
            padded.extend_from_slice(&[0u8; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(ty, &padded, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn incompressible_and_garbage() {
        let mut x = 0x1234_5678u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data).unwrap().is_none());
        assert!(compress(CompressionType::Zstd, &data).unwrap().is_none());
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &data[..100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &data[..100], &mut out).is_err());
    }
}
