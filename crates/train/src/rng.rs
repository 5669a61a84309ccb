//! Small, hand-written random number generators.
//!
//! Two kinds, both seeded from a `u64` and both exactly reproducible across platforms and runs:
//!
//! * [`hash`]: a counter-based generator. `hash(seed, i)` is the `i`-th output of a SplitMix64
//!   stream keyed by `seed`, computed directly without visiting outputs `0..i`. The data loader
//!   draws window `i` of a run from `hash(seed, i)`, so its whole state is one counter: saving
//!   `(seed, i)` in a checkpoint and resuming from it continues exactly, whatever happened before.
//! * [`Rng`]: a sequential xoshiro256** generator (seeded through SplitMix64, as its authors
//!   recommend) for weight initialisation, shuffling and sampling. Its state is four words and
//!   serialises with serde, so a checkpoint can hold it too.
//!
//! Why not the `rand` crate: its generators' outputs are not guaranteed to stay the same across
//! versions, and both generators are a dozen lines. The constants are the published ones
//! (Steele, Lea and Flood 2014 for SplitMix64; Blackman and Vigna 2018 for xoshiro256**).

/// SplitMix64's increment: 2^64 divided by the golden ratio, odd.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `counter`-th output of the SplitMix64 stream keyed by `seed`.
///
/// The key is itself mixed, so nearby seeds (0, 1, 2...) give unrelated streams rather than the
/// same stream shifted by one step.
#[inline]
pub fn hash(seed: u64, counter: u64) -> u64 {
    let key = mix64(seed ^ 0x6B69_6C6E_5F72_6E67); // "kiln_rng": keeps hash(0, i) away from mix64(i).
    mix64(key.wrapping_add(counter.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
}

/// A uniform integer in `0..n` from 64 random bits (Lemire's multiply-high). The bias is at most
/// `n / 2^64`, far below anything a training run could notice. `n` must be at least 1.
#[inline]
pub fn below(bits: u64, n: u64) -> u64 {
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

/// A seeded xoshiro256** generator. `Clone` it to fork a reproducible copy; serialise it to
/// resume a stream exactly.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose state is four SplitMix64 outputs of `seed` (never all zero, the one
    /// state xoshiro must avoid, because SplitMix64 outputs of consecutive counters differ).
    pub fn new(seed: u64) -> Rng {
        Rng {
            s: [hash(seed, 0), hash(seed, 1), hash(seed, 2), hash(seed, 3)],
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// A uniform integer in `0..n`; `n` must be at least 1.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        below(self.next_u64(), n)
    }

    /// Uniform in `[0, 1)`: the top 24 bits, so every value is an exact multiple of 2^-24.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal sample (Box-Muller). Each call uses two draws and returns one value; the
    /// second value Box-Muller could give is dropped so that the state stays four plain words.
    /// Computed in f64, so the tails reach about 8.5 sigma instead of f32's 5.8.
    pub fn normal_f32(&mut self) -> f32 {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Shuffles `items` in place (Fisher-Yates), the same way for the same state.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // The reference SplitMix64 (state += gamma; return mix(state)) seeded with 1234567 gives
        // these first outputs (from Vigna's splitmix64.c).
        let mut state: u64 = 1234567;
        let mut reference = || {
            state = state.wrapping_add(GOLDEN_GAMMA);
            mix64(state)
        };
        assert_eq!(reference(), 6457827717110365317);
        assert_eq!(reference(), 3203168211198807973);
    }

    #[test]
    fn xoshiro256starstar_matches_the_reference() {
        // xoshiro256** from state [1, 2, 3, 4] (the published reference vector, also checked with
        // a Python transcription of Vigna's xoshiro256starstar.c).
        let mut r = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn hash_is_the_keyed_stream() {
        let key = mix64(7 ^ 0x6B69_6C6E_5F72_6E67);
        let mut state = key;
        for i in 0..100 {
            state = state.wrapping_add(GOLDEN_GAMMA);
            assert_eq!(hash(7, i), mix64(state));
        }
    }

    #[test]
    fn uniforms_are_in_range_and_roughly_uniform() {
        let mut r = Rng::new(42);
        let n = 100_000;
        let mut sum = 0.0f64;
        for _ in 0..n {
            let x = r.next_f32();
            assert!((0.0..1.0).contains(&x));
            sum += f64::from(x);
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let mut counts = [0u32; 10];
        for _ in 0..n {
            counts[r.below(10) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut r = Rng::new(3);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| f64::from(r.normal_f32())).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        assert!(xs.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn state_round_trips_and_streams_differ_by_seed() {
        let mut a = Rng::new(9);
        a.next_u64();
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Rng = serde_json::from_str(&json).unwrap();
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = Rng::new(10);
        assert_ne!(Rng::new(9).next_u64(), c.next_u64());
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Rng::new(5).shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
