//! An Avro object container file writer (Avro 1.x spec, "Object Container
//! Files"): magic `Obj\x01`, a metadata map with `avro.schema` and
//! `avro.codec` = `null`, a random 16-byte sync marker, then blocks of
//! (record count, byte size, the records' binary bodies, the sync marker).
//!
//! The records are written as given: binary bodies of the schema in the
//! header, without the single-object header (`C3 01` + fingerprint).

use std::io::Write;

/// Records per block; a block is also closed when its bodies reach
/// [`BLOCK_BYTES`].
pub const BLOCK_RECORDS: i64 = 1000;
/// Bytes of bodies per block (a soft limit: one record may exceed it).
pub const BLOCK_BYTES: usize = 1 << 16;

/// Writes an object container file to `W`.
#[derive(Debug)]
pub struct OcfWriter<W: Write> {
    out: W,
    sync: [u8; 16],
    block: Vec<u8>,
    count: i64,
    records: u64,
}

/// Avro `long`: zig-zag, then base-128 varint, low group first.
pub fn write_long(buf: &mut Vec<u8>, n: i64) {
    let mut v = u64::from_ne_bytes(((n << 1) ^ (n >> 63)).to_ne_bytes());
    while v >= 0x80 {
        buf.push(u8::try_from(v & 0x7f).expect("7 bits") | 0x80);
        v >>= 7;
    }
    buf.push(u8::try_from(v).expect("below 0x80"));
}

/// Avro `bytes` / `string`: length as a long, then the bytes.
pub fn write_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    write_long(buf, i64::try_from(b.len()).expect("length fits in i64"));
    buf.extend_from_slice(b);
}

impl<W: Write> OcfWriter<W> {
    /// Writes the header for `schema_json`.
    pub fn new(mut out: W, schema_json: &str) -> std::io::Result<OcfWriter<W>> {
        let sync = *uuid::Uuid::new_v4().as_bytes();
        let mut h = Vec::with_capacity(schema_json.len() + 64);
        h.extend_from_slice(b"Obj\x01");
        // The metadata map: one block of two entries, then the end marker.
        write_long(&mut h, 2);
        write_bytes(&mut h, b"avro.schema");
        write_bytes(&mut h, schema_json.as_bytes());
        write_bytes(&mut h, b"avro.codec");
        write_bytes(&mut h, b"null");
        write_long(&mut h, 0);
        h.extend_from_slice(&sync);
        out.write_all(&h)?;
        Ok(OcfWriter {
            out,
            sync,
            block: Vec::with_capacity(BLOCK_BYTES),
            count: 0,
            records: 0,
        })
    }

    /// Appends one record's binary body.
    pub fn append(&mut self, body: &[u8]) -> std::io::Result<()> {
        self.block.extend_from_slice(body);
        self.count += 1;
        self.records += 1;
        if self.count >= BLOCK_RECORDS || self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> std::io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let mut h = Vec::with_capacity(20);
        write_long(&mut h, self.count);
        write_long(
            &mut h,
            i64::try_from(self.block.len()).expect("block size fits in i64"),
        );
        self.out.write_all(&h)?;
        self.out.write_all(&self.block)?;
        self.out.write_all(&self.sync)?;
        self.block.clear();
        self.count = 0;
        Ok(())
    }

    /// Records appended so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Writes the last block and flushes; returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.flush_block()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_are_zigzag_varints() {
        let enc = |n| {
            let mut b = Vec::new();
            write_long(&mut b, n);
            b
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(-1), [0x01]);
        assert_eq!(enc(1), [0x02]);
        assert_eq!(enc(-64), [0x7f]);
        assert_eq!(enc(64), [0x80, 0x01]);
        assert_eq!(enc(i64::MAX).len(), 10);
        assert_eq!(
            enc(i64::MIN),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn layout_is_header_blocks_and_sync_markers() {
        let mut w = OcfWriter::new(Vec::new(), "\"long\"").unwrap();
        for n in [1i64, 2, 3] {
            let mut b = Vec::new();
            write_long(&mut b, n);
            w.append(&b).unwrap();
        }
        assert_eq!(w.records(), 3);
        let sync = w.sync;
        let bytes = w.finish().unwrap();
        assert_eq!(&bytes[..4], b"Obj\x01");
        let header_end = bytes
            .windows(16)
            .position(|x| x == sync)
            .expect("sync after the header")
            + 16;
        // count 3, size 3, bodies 02 04 06, sync
        assert_eq!(&bytes[header_end..header_end + 5], [6, 6, 2, 4, 6]);
        assert_eq!(&bytes[header_end + 5..], sync);
    }
}
