//! Deterministic synthetic content for tests, benchmarks and demos: a splitmix64 generator
//! and web-like records (HTML table rows with repeated markup and varying values), so that
//! every user measures against the same data without a randomness crate.

/// splitmix64: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    /// A uniform value in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next 64 random bits. (Not an `Iterator`: the stream never ends, and `next`
    /// reads naturally at the call sites.)
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const WORDS: &[&str] = &[
    "proxy",
    "cluster",
    "member",
    "dictionary",
    "affinity",
    "upstream",
    "downstream",
    "chunk",
    "token",
    "epoch",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
    "enterprise",
    "gateway",
];

/// About `n` bytes of HTML table rows: fixed markup, random words, ids, prices and dates.
pub fn html_records(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n + 512);
    out.extend_from_slice(b"<!doctype html>\n<html><head><title>inventory</title></head><body><table>\n");
    let mut row = 0u64;
    while out.len() < n {
        row += 1;
        let words: Vec<&str> = (0..3 + rng.below(12)).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect();
        let line = format!(
            "<tr class=\"row-{}\" data-id=\"{}\"><td>{}</td><td class=\"price\">{}.{:02} EUR</td><td>2024-{:02}-{:02}T{:02}:{:02}:00Z</td><td>{}</td></tr>\n",
            row % 7,
            rng.next() % 1_000_000,
            words[0],
            rng.below(5000),
            rng.below(100),
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            words.join(" "),
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(n);
    out
}
