//! An Avro object container file writer (Avro 1.x spec, "Object Container
//! Files"): magic `Obj\x01`, a metadata map with `avro.schema` and
//! `avro.codec` = `null`, a random 16-byte sync marker, then blocks of
//! (record count, byte size, the records' binary bodies, the sync marker).
//!
//! The records are written as given: binary bodies of the schema in the
//! header, without the single-object header (`C3 01` + fingerprint); for
//! envelopes, [`super::current_body`] gives them. The numbers are written
//! with the direct writer's primitives (`direct.rs`).

use super::direct::Writer;
use std::io::Write;

/// Records per block; a block is also closed when its bodies reach
/// [`BLOCK_BYTES`].
pub const BLOCK_RECORDS: i64 = 1000;
/// Bytes of bodies per block (a soft limit: one record may exceed it).
pub const BLOCK_BYTES: usize = 1 << 16;

/// The container's magic bytes.
const MAGIC: &[u8; 4] = b"Obj\x01";

/// Writes an object container file to `W`.
#[derive(Debug)]
pub struct ContainerWriter<W: Write> {
    out: W,
    sync: [u8; 16],
    block: Vec<u8>,
    count: i64,
    records: u64,
}

impl<W: Write> ContainerWriter<W> {
    /// Writes the header for `schema_json`.
    pub fn new(mut out: W, schema_json: &str) -> std::io::Result<ContainerWriter<W>> {
        let sync = *uuid::Uuid::new_v4().as_bytes();
        let mut h = Vec::with_capacity(schema_json.len() + 64);
        h.extend_from_slice(MAGIC);
        let mut w = Writer(&mut h);
        // The metadata map: one block of two entries, then the end marker.
        // Its values are Avro `bytes`, laid out as a `string` is.
        w.long(2);
        w.str("avro.schema");
        w.str(schema_json);
        w.str("avro.codec");
        w.str("null");
        w.long(0);
        h.extend_from_slice(&sync);
        out.write_all(&h)?;
        Ok(ContainerWriter {
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
        let mut w = Writer(&mut h);
        w.long(self.count);
        w.long(i64::try_from(self.block.len()).expect("block size fits in i64"));
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
    use crate::avro::{ENVELOPE_SCHEMA_JSON, convert, current_body, encode};
    use crate::event::Timestamp;

    fn long(n: i64) -> Vec<u8> {
        let mut b = Vec::new();
        Writer(&mut b).long(n);
        b
    }

    #[test]
    fn longs_are_zigzag_varints() {
        assert_eq!(long(0), [0x00]);
        assert_eq!(long(-1), [0x01]);
        assert_eq!(long(1), [0x02]);
        assert_eq!(long(-64), [0x7f]);
        assert_eq!(long(64), [0x80, 0x01]);
        assert_eq!(long(i64::MAX).len(), 10);
        assert_eq!(
            long(i64::MIN),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn layout_is_header_blocks_and_sync_markers() {
        let mut w = ContainerWriter::new(Vec::new(), "\"long\"").unwrap();
        for n in [1i64, 2, 3] {
            w.append(&long(n)).unwrap();
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

    #[test]
    fn apache_avro_reads_a_file_of_envelopes_over_several_blocks() {
        let start = Timestamp::from_micros(1_700_000_000_000_000);
        let mut sent = Vec::new();
        for i in 0..150 {
            sent.extend(crate::samples::one_of_each("c", &format!("k{i}"), start));
        }
        assert!(i64::try_from(sent.len()).unwrap() > BLOCK_RECORDS);
        let mut w = ContainerWriter::new(Vec::new(), ENVELOPE_SCHEMA_JSON).unwrap();
        for env in &sent {
            let datum = encode(env).unwrap();
            w.append(&current_body(&datum, env).unwrap()).unwrap();
        }
        let bytes = w.finish().unwrap();
        let reader = apache_avro::Reader::new(&bytes[..]).unwrap();
        let got: Vec<_> = reader
            .map(|v| convert::from_value(v.unwrap()).unwrap())
            .collect();
        assert_eq!(got, sent);
    }
}
