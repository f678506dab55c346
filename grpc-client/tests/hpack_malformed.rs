//! The HPACK decoder against input it must survive: the same properties the fuzz target
//! (`fuzz/fuzz_targets/hpack_decode.rs`) checks, run by plain `cargo test` so CI exercises
//! them without a fuzzer: any bytes, split into any blocks on one decoder, and mutations
//! of valid blocks decode to a result or an error, never a panic, and never leave the
//! dynamic table above its limit; and a model of the dynamic table (insertions, evictions,
//! size updates, references by index) agrees with the decoder on every block.
use proptest::prelude::*;
use rthooks_grpc_client::hpack::{self, Decoder};

/// RFC 7541 C.4.1–C.4.3 and C.6.1–C.6.3: valid blocks with Huffman strings, dynamic-table
/// references and evictions, to mutate.
const VALID: &[&str] = &[
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be58086e6f2d6361636865",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Decodes `blocks` in turn on one decoder with table size `limit`, checking after each
/// that the table is within its bounds.
fn decode_all(limit: usize, blocks: &[Vec<u8>]) {
    let mut d = Decoder::new(limit);
    for b in blocks {
        let _ = d.decode(b);
        assert!(d.max_table_size() <= limit, "max size above the limit");
        assert!(
            d.table_size() <= d.max_table_size(),
            "table above its max size"
        );
        assert!(
            d.table_len() * 32 <= d.table_size(),
            "entries without their size"
        );
    }
}

#[test]
fn the_valid_blocks_decode() {
    let mut d = Decoder::new(256);
    for b in &VALID[3..] {
        d.decode(&hex(b)).unwrap();
    }
    assert_eq!(d.table_size(), 215);
    let mut d = Decoder::default();
    for b in &VALID[..3] {
        d.decode(&hex(b)).unwrap();
    }
    assert_eq!(d.table_size(), 164);
}

/// What a block of the model is made of.
#[derive(Debug, Clone)]
enum Op {
    /// Literal with incremental indexing, new name, raw strings.
    Insert(Vec<u8>, Vec<u8>),
    /// Indexed field naming the model's dynamic entry `k % len` (skipped when empty).
    Ref(usize),
    /// Dynamic table size update to `n % (limit + 1)`: only at the start of a block.
    Resize(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..80);
    prop_oneof![
        3 => (bytes(), bytes()).prop_map(|(n, v)| Op::Insert(n, v)),
        3 => any::<usize>().prop_map(Op::Ref),
        1 => any::<usize>().prop_map(Op::Resize),
    ]
}

/// RFC 7541 §4: the dynamic table as a list, newest first, evicting from the end.
#[derive(Default)]
struct Model {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    max: usize,
}

impl Model {
    fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|(n, v)| n.len() + v.len() + 32)
            .sum()
    }

    fn evict_to(&mut self, max: usize) {
        while self.size() > max {
            self.entries.pop();
        }
    }

    fn insert(&mut self, n: Vec<u8>, v: Vec<u8>) {
        let size = n.len() + v.len() + 32;
        if size > self.max {
            self.entries.clear();
            return;
        }
        self.evict_to(self.max - size);
        self.entries.insert(0, (n, v));
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    hpack::write_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_in_any_blocks(
        limit in 0usize..5000,
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5),
    ) {
        decode_all(limit, &blocks);
    }

    #[test]
    fn mutated_valid_blocks(
        which in 0..VALID.len(),
        flips in proptest::collection::vec((any::<usize>(), 0u8..8), 0..6),
        cut in any::<usize>(),
        insert in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let mut b = hex(VALID[which]);
        for (at, bit) in flips {
            let at = at % b.len();
            b[at] ^= 1 << bit;
        }
        for (at, byte) in insert {
            b.insert(at % (b.len() + 1), byte);
        }
        b.truncate(cut % (b.len() + 1) + b.len() / 2);
        // After the valid blocks before it, so that its references meet a filled table.
        let mut blocks: Vec<Vec<u8>> = VALID[..which].iter().map(|v| hex(v)).collect();
        blocks.push(b);
        decode_all(if which >= 3 { 256 } else { 4096 }, &blocks);
    }

    #[test]
    fn huffman_strings_of_any_bits(s in proptest::collection::vec(any::<u8>(), 0..64)) {
        // A result or an error; the shortest code is 5 bits long.
        if let Ok(text) = hpack::huffman_decode(&s) {
            prop_assert!(text.len() * 5 <= s.len() * 8);
        }
    }

    #[test]
    fn literals_round_trip(name in "[a-z-]{1,40}", value in any::<String>()) {
        let mut block = Vec::new();
        hpack::write_literal(&mut block, 0, &name, &value);
        hpack::write_literal(&mut block, 4, "", &value);
        let h = Decoder::default().decode(&block).unwrap();
        prop_assert_eq!(h, vec![
            (name.into_bytes(), value.clone().into_bytes()),
            (b":path".to_vec(), value.into_bytes()),
        ]);
    }

    #[test]
    fn the_dynamic_table_behaves_as_rfc_7541_says(
        limit in 0usize..600,
        blocks in proptest::collection::vec(proptest::collection::vec(op(), 0..12), 1..6),
    ) {
        let mut d = Decoder::new(limit);
        let mut model = Model { max: limit, ..Model::default() };
        for ops in blocks {
            let mut block = Vec::new();
            let mut expected = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(n, v) => {
                        block.push(0x40);
                        string(&mut block, &n);
                        string(&mut block, &v);
                        expected.push((n.clone(), v.clone()));
                        model.insert(n, v);
                    }
                    Op::Ref(k) if !model.entries.is_empty() => {
                        let k = k % model.entries.len();
                        hpack::write_int(&mut block, 0x80, 7, 62 + k);
                        expected.push(model.entries[k].clone());
                    }
                    Op::Resize(n) if i == 0 => {
                        let n = n % (limit + 1);
                        hpack::write_int(&mut block, 0x20, 5, n);
                        model.max = n;
                        model.evict_to(n);
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(d.decode(&block).unwrap(), expected);
            prop_assert_eq!(d.table_size(), model.size());
            prop_assert_eq!(d.table_len(), model.entries.len());
        }
    }
}
