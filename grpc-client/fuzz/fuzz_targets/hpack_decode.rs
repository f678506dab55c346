//! The HPACK decoder on arbitrary header blocks: several blocks on one decoder (so that
//! later blocks refer to what earlier ones put in the dynamic table), with an arbitrary
//! table limit. It must return a result or an error, never panic, and keep the table
//! within its limit; a Huffman string decodes to at most 8/5 of its length (the shortest
//! code has 5 bits). `tests/hpack_malformed.rs` checks the same without a fuzzer.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use rthooks_grpc_client::hpack::{huffman_decode, Decoder};

#[derive(Debug, Arbitrary)]
struct Input {
    limit: u16,
    blocks: Vec<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let limit = usize::from(input.limit);
    let mut d = Decoder::new(limit);
    for block in &input.blocks {
        let _ = d.decode(block);
        assert!(d.max_table_size() <= limit);
        assert!(d.table_size() <= d.max_table_size());
        assert!(d.table_len() * 32 <= d.table_size());
        if let Ok(text) = huffman_decode(block) {
            assert!(text.len() * 5 <= block.len() * 8);
        }
    }
});
