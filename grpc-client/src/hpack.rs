//! HPACK (RFC 7541) header decoding for the server's responses, and the few encodings the
//! request needs.
//!
//! The client sends one request per connection, but a server such as hyper's h2
//! Huffman-codes values and indexes them in the dynamic table, and the trailers that carry
//! `grpc-status` may refer to entries the response headers added: hence a complete
//! decoder, not a lookup of a few static indexes.
use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a header block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("HPACK: {0}")]
pub struct HpackError(pub &'static str);

type R<T> = std::result::Result<T, HpackError>;

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Code lengths of the Huffman code (RFC 7541 Appendix B), symbols 0–255 and EOS (256).
/// The code is canonical (codes of one length are consecutive, in symbol order), so the
/// lengths alone define it.
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;

/// Canonical decoding tables: per code length, the first code, how many codes, and where
/// their symbols start in `symbols` (sorted by length, then symbol).
struct Huffman {
    first_code: [u32; 31],
    count: [u32; 31],
    first_index: [u32; 31],
    symbols: [u16; 257],
}

fn huffman() -> &'static Huffman {
    static H: OnceLock<Huffman> = OnceLock::new();
    H.get_or_init(|| {
        let mut h = Huffman {
            first_code: [0; 31],
            count: [0; 31],
            first_index: [0; 31],
            symbols: [0; 257],
        };
        for &l in &HUFFMAN_LENGTHS {
            h.count[l as usize] += 1;
        }
        let (mut code, mut index) = (0u32, 0u32);
        for l in 1..31 {
            code = (code + h.count[l - 1]) << 1;
            h.first_code[l] = code;
            h.first_index[l] = index;
            index += h.count[l];
        }
        let mut next = h.first_index;
        for (sym, &l) in HUFFMAN_LENGTHS.iter().enumerate() {
            h.symbols[next[l as usize] as usize] = sym as u16;
            next[l as usize] += 1;
        }
        h
    })
}

/// Decodes a Huffman-coded string (RFC 7541 §5.2).
pub fn huffman_decode(src: &[u8]) -> R<Vec<u8>> {
    let h = huffman();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if len > 30 {
                return Err(HpackError("invalid Huffman code"));
            }
            let offset = code.wrapping_sub(h.first_code[len]);
            if code >= h.first_code[len] && offset < h.count[len] {
                let sym = h.symbols[(h.first_index[len] + offset) as usize];
                if sym == EOS {
                    return Err(HpackError("EOS in a Huffman string"));
                }
                out.push(sym as u8);
                code = 0;
                len = 0;
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError("invalid Huffman padding"));
    }
    Ok(out)
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 §5.1).
fn read_int(buf: &[u8], pos: &mut usize, n: u8) -> R<usize> {
    let mask = (1usize << n) - 1;
    let first = *buf.get(*pos).ok_or(HpackError("truncated integer"))?;
    *pos += 1;
    let mut v = usize::from(first) & mask;
    if v < mask {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError("truncated integer"))?;
        *pos += 1;
        // Header values are small; anything past 2^28 is an attack or garbage.
        if shift > 21 {
            return Err(HpackError("integer too large"));
        }
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

fn read_string(buf: &[u8], pos: &mut usize) -> R<Vec<u8>> {
    let huff = buf.get(*pos).ok_or(HpackError("truncated string"))? & 0x80 != 0;
    let len = read_int(buf, pos, 7)?;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or(HpackError("truncated string"))?;
    let raw = &buf[*pos..end];
    *pos = end;
    if huff {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

/// A decoder with its dynamic table; one per connection.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first: dynamic index 62 is `table[0]`.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// What we allowed the peer (SETTINGS_HEADER_TABLE_SIZE; we keep the default).
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(4096)
    }
}

impl Decoder {
    pub fn new(limit: usize) -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// The dynamic table's size as RFC 7541 §4.1 counts it: per entry, name + value + 32.
    pub fn table_size(&self) -> usize {
        self.size
    }

    /// How many entries the dynamic table holds.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// The table's maximum size now: the limit given to [`Decoder::new`], or less after a
    /// dynamic table size update.
    pub fn max_table_size(&self) -> usize {
        self.max_size
    }

    fn get(&self, index: usize) -> R<(Vec<u8>, Vec<u8>)> {
        match index {
            0 => Err(HpackError("index 0")),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError("index past the dynamic table")),
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Decodes one complete header block into (name, value) pairs.
    pub fn decode(&mut self, block: &[u8]) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                let i = read_int(block, &mut pos, 7)?;
                out.push(self.get(i)?);
            } else if b & 0xc0 == 0x40 {
                let (n, v) = self.literal(block, &mut pos, 6)?;
                self.insert(n.clone(), v.clone());
                out.push((n, v));
            } else if b & 0xe0 == 0x20 {
                let size = read_int(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(HpackError("table size update above the limit"));
                }
                self.max_size = size;
                self.evict_to(size);
            } else {
                // Without indexing (0000) or never indexed (0001).
                out.push(self.literal(block, &mut pos, 4)?);
            }
        }
        Ok(out)
    }

    fn literal(&self, block: &[u8], pos: &mut usize, prefix: u8) -> R<(Vec<u8>, Vec<u8>)> {
        let i = read_int(block, pos, prefix)?;
        let name = if i == 0 {
            read_string(block, pos)?
        } else {
            self.get(i)?.0
        };
        Ok((name, read_string(block, pos)?))
    }
}

/// Appends an integer with an `n`-bit prefix; `flags` fills the bits above the prefix.
pub fn write_int(out: &mut Vec<u8>, flags: u8, n: u8, mut v: usize) {
    let mask = (1usize << n) - 1;
    if v < mask {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | mask as u8);
    v -= mask;
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a "literal header field without indexing": a static-table name index, or 0
/// and the name itself; raw (not Huffman-coded) strings. The request's headers are few and
/// sent once per connection, so neither indexing nor Huffman coding would pay.
pub fn write_literal(out: &mut Vec<u8>, name_index: usize, name: &str, value: &str) {
    write_int(out, 0x00, 4, name_index);
    if name_index == 0 {
        write_int(out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
    }
    write_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn text(h: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
        h.iter()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.clone()).unwrap(),
                    String::from_utf8(v.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// RFC 7541 C.4: requests with Huffman coding, sharing one dynamic table.
    #[test]
    fn rfc7541_c4_huffman_requests() {
        let mut d = Decoder::default();
        let h = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .unwrap();
        assert_eq!(
            text(&h),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let h = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(text(&h)[4], ("cache-control".into(), "no-cache".into()));
        assert_eq!(text(&h)[3], (":authority".into(), "www.example.com".into()));
        let h = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .unwrap();
        assert_eq!(text(&h)[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(text(&h)[1], (":scheme".into(), "https".into()));
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.6: responses with Huffman coding and evictions from a 256-byte table.
    #[test]
    fn rfc7541_c6_huffman_responses_with_eviction() {
        let mut d = Decoder::new(256);
        let h = d
            .decode(&hex(
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0
                 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ))
            .unwrap();
        assert_eq!(
            text(&h),
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        let h = d.decode(&hex("4883 640e ffc1 c0bf")).unwrap();
        assert_eq!(text(&h)[0], (":status".into(), "307".into()));
        assert_eq!(
            text(&h)[3],
            ("location".into(), "https://www.example.com".into())
        );
        let h = d
            .decode(&hex(
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b
                 d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27
                 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ))
            .unwrap();
        assert_eq!(
            text(&h)[5],
            (
                "set-cookie".into(),
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1".into()
            )
        );
        assert_eq!(
            text(&h)[2],
            ("date".into(), "Mon, 21 Oct 2013 20:13:22 GMT".into())
        );
        assert_eq!(d.size, 215);
        assert_eq!(d.table.len(), 3);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut d = Decoder::default();
        for bad in [
            &[0x80][..],                                     // index 0
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..], // huge integer
            &[0xbe][..],                                     // dynamic index that does not exist
            &[0x40, 0x85, 0xff][..],                         // truncated string
            &[0x3f, 0xe2, 0x1f][..],                         // table size above the limit
            &[0x00, 0x81, 0x00, 0x00][..],                   // Huffman padding of zeros
            &[0x00, 0x84, 0xff, 0xff, 0xff, 0xff, 0x00][..], // EOS
        ] {
            assert!(d.decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn literals_round_trip_through_the_decoder() {
        let mut block = Vec::new();
        write_literal(
            &mut block,
            4,
            "",
            "/tetragon.FineGuidanceSensors/RuntimeHook",
        );
        write_literal(&mut block, 0, "te", "trailers");
        let long = "v".repeat(300);
        write_literal(&mut block, 0, "x-long", &long);
        let h = Decoder::default().decode(&block).unwrap();
        assert_eq!(
            text(&h),
            pairs(&[
                (":path", "/tetragon.FineGuidanceSensors/RuntimeHook"),
                ("te", "trailers"),
                ("x-long", &long),
            ])
        );
    }
}
