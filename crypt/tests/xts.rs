//! XTS on both engines against IEEE 1619-2007 annex B, and the AES-NI
//! engine against the `xts-mode` one on random sectors.

mod common;

use common::{bytes, hex, rng};
use crypt::xts::{BadKey, Xts};

/// Both engines for `key`, checking each is what it says.
fn engines(key: &[u8]) -> [Xts; 2] {
    let ni = Xts::new(key).unwrap();
    assert_eq!(ni.engine(), "aes-ni", "Xts::new on a CPU with AES-NI");
    let soft = Xts::new_soft(key).unwrap();
    assert_eq!(soft.engine(), "soft");
    [ni, soft]
}

/// The plaintext of vectors 4 to 14: bytes 0..=255, twice.
fn ramp() -> String {
    (0..512).map(|i| format!("{:02x}", i % 256)).collect()
}

struct Vector {
    number: u32,
    key: &'static str,
    sector: u64,
    pt: String,
    ct: &'static str,
}

fn vectors() -> Vec<Vector> {
    let fill = |b: &str, n| b.repeat(n);
    vec![
        Vector {
            number: 1,
            key: "00000000000000000000000000000000 00000000000000000000000000000000",
            sector: 0,
            pt: fill("00", 32),
            ct: "917cf69ebd68b2ec9b9fe9a3eadda692 cd43d2f59598ed858c02c2652fbf922e",
        },
        Vector {
            number: 2,
            key: "11111111111111111111111111111111 22222222222222222222222222222222",
            sector: 0x33_3333_3333,
            pt: fill("44", 32),
            ct: "c454185e6a16936e39334038acef838b fb186fff7480adc4289382ecd6d394f0",
        },
        Vector {
            number: 4,
            key: "27182818284590452353602874713526 31415926535897932384626433832795",
            sector: 0,
            pt: ramp(),
            ct: "27a7479befa1d476489f308cd4cfa6e2 a96e4bbe3208ff25287dd3819616e89c
                 c78cf7f5e543445f8333d8fa7f560000 05279fa5d8b5e4ad40e736ddb4d35412
                 328063fd2aab53e5ea1e0a9f332500a5 df9487d07a5c92cc512c8866c7e860ce
                 93fdf166a24912b422976146ae20ce84 6bb7dc9ba94a767aaef20c0d61ad0265
                 5ea92dc4c4e41a8952c651d33174be51 a10c421110e6d81588ede82103a252d8
                 a750e8768defffed9122810aaeb99f91 72af82b604dc4b8e51bcb08235a6f434
                 1332e4ca60482a4ba1a03b3e65008fc5 da76b70bf1690db4eae29c5f1badd03c
                 5ccf2a55d705ddcd86d449511ceb7ec3 0bf12b1fa35b913f9f747a8afd1b130e
                 94bff94effd01a91735ca1726acd0b19 7c4e5b03393697e126826fb6bbde8ecc
                 1e08298516e2c9ed03ff3c1b7860f6de 76d4cecd94c8119855ef5297ca67e9f3
                 e7ff72b1e99785ca0a7e7720c5b36dc6 d72cac9574c8cbbc2f801e23e56fd344
                 b07f22154beba0f08ce8891e643ed995 c94d9a69c9f1b5f499027a78572aeebd
                 74d20cc39881c213ee770b1010e4bea7 18846977ae119f7a023ab58cca0ad752
                 afe656bb3c17256a9f6e9bf19fdd5a38 fc82bbe872c5539edb609ef4f79c203e
                 bb140f2e583cb2ad15b4aa5b655016a8 449277dbd477ef2c8d6c017db738b18d
                 eb4a427d1923ce3ff262735779a418f2 0a282df920147beabe421ee5319d0568",
        },
        Vector {
            number: 10,
            key: "2718281828459045235360287471352662497757247093699959574966967627
                  3141592653589793238462643383279502884197169399375105820974944592",
            sector: 0xff,
            pt: ramp(),
            ct: "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
                 5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
                 5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
                 c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
                 2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
                 b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
                 93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
                 583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
                 84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
                 505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
                 9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
                 a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
                 6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
                 645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
                 1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
                 773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        },
        // A data unit number past 2^32.
        Vector {
            number: 14,
            key: "2718281828459045235360287471352662497757247093699959574966967627
                  3141592653589793238462643383279502884197169399375105820974944592",
            sector: 0xff_ffff_ffff,
            pt: ramp(),
            ct: "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed23
                 50eae7e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b80
                 8da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604
                 e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4
                 a950781933d79a28272b782a2ec313efdfcc0628f43d744c2dc2ff3dcb66999b
                 50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434
                 631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d8
                 76c18366dd8683f53412c0c180f9c848592d593f8609ca736317d356e13e2bff
                 3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b
                 f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f6
                 85b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e465aa
                 6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc
                 e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a
                 0acdec676fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd9272120546
                 81d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de
                 6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
        },
        // Ciphertext stealing: 17 to 20 bytes.
        Vector {
            number: 15,
            key: "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0 bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
            sector: 0x12_3456_789a,
            pt: "000102030405060708090a0b0c0d0e0f10".into(),
            ct: "6c1625db4671522d3d7599601de7ca09ed",
        },
        Vector {
            number: 16,
            key: "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0 bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
            sector: 0x12_3456_789a,
            pt: "000102030405060708090a0b0c0d0e0f1011".into(),
            ct: "d069444b7a7e0cab09e24447d24deb1fedbf",
        },
        Vector {
            number: 17,
            key: "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0 bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
            sector: 0x12_3456_789a,
            pt: "000102030405060708090a0b0c0d0e0f101112".into(),
            ct: "e5df1351c0544ba1350b3363cd8ef4beedbf9d",
        },
        Vector {
            number: 18,
            key: "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0 bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0",
            sector: 0x12_3456_789a,
            pt: "000102030405060708090a0b0c0d0e0f10111213".into(),
            ct: "9d84c813f719aa2c7be3f66171c7c5c2edbf9dac",
        },
    ]
}

#[test]
fn ieee_1619_vectors_on_both_engines() {
    for v in vectors() {
        let (pt, ct) = (hex(&v.pt), hex(v.ct));
        assert_eq!(pt.len(), ct.len(), "vector {}", v.number);
        for x in engines(&hex(v.key)) {
            let ctx = format!("vector {}, {}", v.number, x.engine());
            let mut b = pt.clone();
            x.encrypt(&mut b, pt.len(), v.sector);
            assert_eq!(b, ct, "encrypt, {ctx}");
            x.decrypt(&mut b, pt.len(), v.sector);
            assert_eq!(b, pt, "decrypt, {ctx}");
        }
    }
}

/// Vector 4 as the first sector of a longer run: its neighbours must not
/// disturb it.
#[test]
fn a_vector_inside_a_longer_run() {
    let v = &vectors()[2];
    assert_eq!(v.number, 4);
    let (pt, ct) = (hex(&v.pt), hex(v.ct));
    for x in engines(&hex(v.key)) {
        let mut run = pt.repeat(5);
        x.encrypt(&mut run, 512, 0);
        assert_eq!(&run[..512], &ct[..], "{}", x.engine());
        assert_ne!(&run[512..1024], &ct[..], "{}: sector 1 differs", x.engine());
        x.decrypt(&mut run, 512, 0);
        assert_eq!(run, pt.repeat(5), "{}", x.engine());
    }
}

#[test]
fn both_engines_refuse_bad_keys() {
    for n in [0, 16, 31, 33, 48, 63, 65, 128] {
        let key = vec![7; n];
        assert!(matches!(Xts::new(&key), Err(BadKey)), "new, {n} bytes");
        assert!(
            matches!(Xts::new_soft(&key), Err(BadKey)),
            "new_soft, {n} bytes"
        );
    }
}

#[test]
fn aes_ni_matches_soft_on_random_sectors() {
    let mut r = rng("xts ni vs soft");
    let firsts = [
        0,
        1,
        7,
        0xffff_ffff,
        1 << 32,
        (1 << 40) + 3,
        u64::MAX - 3,
        u64::MAX,
    ];
    // 512 and 4096 as disks use them; 16, 4112 and sizes with a partial
    // last block (stealing) as the API allows them.
    let sizes = [16, 17, 31, 512, 520, 4096, 4112];
    for key_len in [32, 64] {
        for &size in &sizes {
            for &first in &firsts {
                let key = bytes(&mut r, key_len);
                let [ni, soft] = engines(&key);
                let count = if size >= 4096 { 3 } else { 19 };
                let data = bytes(&mut r, size * count);
                let ctx = format!("{key_len}-byte key, {size}-byte sectors from {first:#x}");

                let mut a = data.clone();
                let mut b = data.clone();
                ni.encrypt(&mut a, size, first);
                soft.encrypt(&mut b, size, first);
                assert!(a == b, "encrypt, {ctx}");
                assert_ne!(a, data, "{ctx}");
                ni.decrypt(&mut a, size, first);
                assert!(a == data, "round trip, {ctx}");

                let mut a = data.clone();
                let mut b = data.clone();
                ni.decrypt(&mut a, size, first);
                soft.decrypt(&mut b, size, first);
                assert!(a == b, "decrypt, {ctx}");
            }
        }
    }
}

#[test]
fn one_call_equals_sector_by_sector() {
    let mut r = rng("xts split");
    let key = bytes(&mut r, 64);
    let x = Xts::new(&key).unwrap();
    let data = bytes(&mut r, 512 * 21);
    let mut whole = data.clone();
    x.encrypt(&mut whole, 512, (1 << 33) + 5);
    let mut parts = data.clone();
    for (i, s) in parts.chunks_mut(512).enumerate() {
        x.encrypt(s, 512, (1 << 33) + 5 + i as u64);
    }
    assert!(whole == parts);
}
