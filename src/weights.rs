//! Weights files as they are published, read into one form.
//!
//! A vox2vec backbone reaches a user as one of:
//! - our checkpoint (safetensors; keys `backbone.*`, `head.*`, `optim.*`, metadata with the
//!   model configuration and how it was trained);
//! - a bare FPN3d state_dict in safetensors (keys `first_conv.weight`, `left_blocks.0...`);
//! - a PyTorch file written by `torch.save` (`.pt` / `.pth`: the zip container of PyTorch >= 1.6
//!   or the legacy pickle stream before it), holding an FPN3d state_dict — the reference's
//!   published `vox2vec_contrastive.pt` is one;
//! - a PyTorch Lightning checkpoint (`.ckpt`: a `torch.save`d dict whose `state_dict` holds the
//!   LightningModule's weights under its attribute names, `backbone.` and `proj_head.` for the
//!   reference's `Vox2Vec` module, `model.backbone.` when the module is wrapped once more).
//!
//! PyTorch containers are read by the `pytorch-reader` crate (no Python). Every file becomes a
//! `WeightsFile`: its tensors under this crate's names (`backbone.<FPN3d key>`, `head.<key>`
//! for the projection head), the module prefixes that were mapped, the tensors that were left
//! out (a Lightning checkpoint's optimiser state, other modules), and the metadata. The model
//! configuration comes from the metadata when the file records it, else from the tensors'
//! names and shapes (`infer_backbone`); `resolve_backbone` checks explicit flags against it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::{Dtype, SafeTensors};

use crate::model::{BACKBONE_PREFIX, FpnConfig, HEAD_PREFIX};

/// A tensor's values: floating point (any float dtype, widened or narrowed to f32) or integer
/// (BatchNorm's `num_batches_tracked`).
#[derive(Debug, Clone)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// The element types read from either container (little-endian bytes).
#[derive(Clone, Copy)]
enum Elem {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
}

impl Elem {
    /// Floats as f32 (widened or narrowed), integers as i64.
    fn decode(self, d: &[u8]) -> Values {
        match self {
            Elem::F32 => Values::F32(bytemuck::pod_collect_to_vec::<u8, f32>(d)),
            Elem::F64 => {
                Values::F32(bytemuck::pod_collect_to_vec::<u8, f64>(d).into_iter().map(|v| v as f32).collect())
            }
            Elem::F16 => Values::F32(
                bytemuck::pod_collect_to_vec::<u8, u16>(d)
                    .into_iter()
                    .map(|v| half::f16::from_bits(v).to_f32())
                    .collect(),
            ),
            Elem::BF16 => Values::F32(
                bytemuck::pod_collect_to_vec::<u8, u16>(d)
                    .into_iter()
                    .map(|v| half::bf16::from_bits(v).to_f32())
                    .collect(),
            ),
            Elem::I64 => Values::I64(bytemuck::pod_collect_to_vec::<u8, i64>(d)),
            Elem::I32 => Values::I64(bytemuck::pod_collect_to_vec::<u8, i32>(d).into_iter().map(i64::from).collect()),
        }
    }
}

/// One tensor of a weights file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// This crate's name (`backbone.first_conv.weight`, `head.0.bias`, `optim.exp_avg.<name>`),
    /// or the file's own key where no mapping applies (segmentation heads).
    pub name: String,
    /// The key in the file (for messages).
    pub source_name: String,
    /// PyTorch shape (conv weights [Co, Ci, kx, ky, kz]).
    pub shape: Vec<usize>,
    pub values: Values,
}

/// How the file was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Safetensors,
    /// `torch.save`, zip container (PyTorch >= 1.6).
    TorchZip,
    /// `torch.save`, legacy pickle stream (PyTorch < 1.6) or older tar container.
    TorchLegacy,
}

impl std::fmt::Display for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Container::Safetensors => "safetensors",
            Container::TorchZip => "PyTorch torch.save (zip)",
            Container::TorchLegacy => "PyTorch torch.save (legacy, before 1.6)",
        })
    }
}

/// A weights file, read and renamed.
#[derive(Debug, Clone)]
pub struct WeightsFile {
    pub path: PathBuf,
    pub container: Container,
    /// Whether the weights sat under a Lightning checkpoint's `state_dict`.
    pub lightning: bool,
    pub metadata: HashMap<String, String>,
    pub entries: Vec<Entry>,
    /// (file prefix, our prefix) pairs that were applied, e.g. ("model.backbone.", "backbone.").
    pub renamed: Vec<(String, String)>,
    /// File keys outside the model, not loaded (a Lightning checkpoint's optimiser state, ...).
    pub ignored: Vec<String>,
}

/// How a file's keys are named in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// A backbone (+ projection head) file: module prefixes recognised and mapped to
    /// `backbone.` / `head.`; a bare FPN3d state_dict is a backbone.
    Model,
    /// Keys taken literally (segmentation heads: `layers.0.weight`, ...).
    Literal,
}

/// Read any supported weights file (the container is recognised from its bytes, not its name).
pub fn read(path: &Path, naming: Naming) -> Result<WeightsFile> {
    let mut head = [0u8; 8];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let n = f.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
        ensure!(n > 0, "{}: the file is empty", path.display());
    }
    if is_torch(&head) {
        read_torch(path, naming)
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        from_safetensors(path, &bytes, naming)
    }
}

/// A zip archive (`PK\x03\x04`: PyTorch >= 1.6), a pickle (`\x80` + protocol: legacy
/// torch.save), or a tar archive (pre-0.1.10 torch.save; checked by pytorch-reader itself).
fn is_torch(head: &[u8; 8]) -> bool {
    head.starts_with(b"PK\x03\x04") || (head[0] == 0x80 && (2..=5).contains(&head[1]))
}

impl WeightsFile {
    /// The same tensors named per `naming` (a file read `Literal` turned into a model file
    /// without reading it again).
    pub fn renamed(self, naming: Naming) -> Result<WeightsFile> {
        let raw = self.entries.into_iter().map(|e| (e.source_name, e.shape, e.values)).collect();
        finish(&self.path, self.container, self.metadata, raw, naming)
    }
}

/// A safetensors file's bytes (`path` names it in errors): every float dtype as f32, integers as i64.
pub fn from_safetensors(path: &Path, bytes: &[u8], naming: Naming) -> Result<WeightsFile> {
    let what = || format!("{}: not a weights file (neither safetensors nor a PyTorch torch.save file)", path.display());
    let (_, header) = SafeTensors::read_metadata(bytes).with_context(what)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).with_context(what)?;
    let mut raw = Vec::new();
    for (key, view) in st.tensors() {
        let elem = match view.dtype() {
            Dtype::F32 => Elem::F32,
            Dtype::F64 => Elem::F64,
            Dtype::F16 => Elem::F16,
            Dtype::BF16 => Elem::BF16,
            Dtype::I64 => Elem::I64,
            Dtype::I32 => Elem::I32,
            t => bail!("{}: key {key} has dtype {t:?}; expected a float or integer tensor", path.display()),
        };
        raw.push((key, view.shape().to_vec(), elem.decode(view.data())));
    }
    finish(path, Container::Safetensors, metadata, raw, naming)
}

fn read_torch(path: &Path, naming: Naming) -> Result<WeightsFile> {
    use pytorch_reader::{DType, FileFormat, PytorchReader};
    let reader = PytorchReader::new(path)
        .map_err(|e| anyhow::anyhow!("{}: not a readable PyTorch file: {e}", path.display()))?;
    let container = match reader.metadata().format_type {
        FileFormat::Zip => Container::TorchZip,
        _ => Container::TorchLegacy,
    };
    let mut raw = Vec::new();
    let mut names: Vec<&String> = reader.tensors().keys().collect();
    names.sort();
    for name in names {
        let t = &reader.tensors()[name];
        let elem = match t.dtype() {
            DType::F32 => Elem::F32,
            DType::F64 => Elem::F64,
            DType::F16 => Elem::F16,
            DType::BF16 => Elem::BF16,
            DType::I64 => Elem::I64,
            DType::I32 => Elem::I32,
            d => bail!("{}: {name} has dtype {d:?}; expected a float or integer tensor", path.display()),
        };
        let bytes = t.read().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        raw.push((name.clone(), t.shape().to_vec(), elem.decode(&bytes)));
    }
    finish(path, container, HashMap::new(), raw, naming)
}

/// Rename (per `naming`) and check sizes.
fn finish(
    path: &Path,
    container: Container,
    metadata: HashMap<String, String>,
    raw: Vec<(String, Vec<usize>, Values)>,
    naming: Naming,
) -> Result<WeightsFile> {
    for (key, shape, values) in &raw {
        let n = match values {
            Values::F32(v) => v.len(),
            Values::I64(v) => v.len(),
        };
        ensure!(n == shape.iter().product::<usize>(), "{}: {key} holds {n} values for shape {shape:?}", path.display());
    }
    let keys: Vec<&str> = raw.iter().map(|(k, _, _)| k.as_str()).collect();
    let (lightning, map) = match naming {
        Naming::Literal => (false, Mapping::identity()),
        Naming::Model => Mapping::for_keys(path, &keys)?,
    };
    let mut entries = Vec::new();
    let mut ignored = Vec::new();
    for (key, shape, values) in raw {
        match map.rename(&key) {
            Some(name) => entries.push(Entry { name, source_name: key, shape, values }),
            None => ignored.push(key),
        }
    }
    ensure!(
        !entries.is_empty(),
        "{}: no model weights found ({} tensors, none under a recognised module: {})",
        path.display(),
        ignored.len(),
        ignored.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(WeightsFile { path: path.to_path_buf(), container, lightning, metadata, entries, renamed: map.renamed, ignored })
}

/// The renaming of one file's keys.
struct Mapping {
    /// (file prefix, our prefix); a key matching none is ignored unless `keep_rest`.
    renamed: Vec<(String, String)>,
    keep_rest: bool,
}

impl Mapping {
    fn identity() -> Mapping {
        Mapping { renamed: Vec::new(), keep_rest: true }
    }

    /// Our own checkpoints are taken as they are; otherwise the backbone is found by its first
    /// convolution (`<prefix>first_conv.weight`) and the projection head beside it
    /// (`<parent>proj_head.` or `<parent>head.`).
    fn for_keys(path: &Path, keys: &[&str]) -> Result<(bool, Mapping)> {
        let ours = |k: &str| k.starts_with(BACKBONE_PREFIX) || k.starts_with(HEAD_PREFIX) || k.starts_with("optim.");
        if keys.iter().all(|k| ours(k)) {
            return Ok((false, Mapping::identity()));
        }
        // pytorch-reader names a nested tensor by its dotted path: a Lightning checkpoint's
        // weights are `state_dict.<module key>`.
        let lightning = keys.iter().any(|k| k.starts_with("state_dict."));
        let outer = if lightning { "state_dict." } else { "" };
        let mut backbones: Vec<&str> = keys
            .iter()
            .filter(|k| k.starts_with(outer))
            .filter_map(|k| k.strip_suffix("first_conv.weight"))
            .filter(|p| p.is_empty() || p.ends_with('.'))
            .collect();
        backbones.sort_by_key(|p| p.len());
        let backbone = match backbones.as_slice() {
            [] => {
                // No FPN3d: a bare safetensors state_dict is read as a backbone (its keys then
                // fail to match by name, with the model's configuration in the message).
                ensure!(
                    !lightning,
                    "{}: a Lightning checkpoint without an FPN3d backbone (no key ends in first_conv.weight)",
                    path.display()
                );
                return Ok((
                    false,
                    Mapping { renamed: vec![(String::new(), BACKBONE_PREFIX.to_string())], keep_rest: false },
                ));
            }
            [one] => one.to_string(),
            several => {
                let want = format!("{outer}backbone.");
                ensure!(
                    several.contains(&want.as_str()),
                    "{}: several FPN3d backbones in one file (under {}); convert the one you want first",
                    path.display(),
                    several.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
                );
                want
            }
        };
        let parent = backbone.strip_suffix("backbone.").unwrap_or(outer);
        let mut renamed = vec![(backbone.clone(), BACKBONE_PREFIX.to_string())];
        for head in ["proj_head.", "head."] {
            let p = format!("{parent}{head}");
            if p != backbone && keys.iter().any(|k| k.starts_with(&p)) {
                renamed.push((p, HEAD_PREFIX.to_string()));
                break;
            }
        }
        Ok((lightning, Mapping { renamed, keep_rest: false }))
    }

    fn rename(&self, key: &str) -> Option<String> {
        // The longest matching prefix wins (a bare backbone's "" matches everything).
        let best =
            self.renamed.iter().filter(|(from, _)| key.starts_with(from.as_str())).max_by_key(|(from, _)| from.len());
        match best {
            Some((from, to)) => Some(format!("{to}{}", &key[from.len()..])),
            None if self.keep_rest => Some(key.to_string()),
            None => None,
        }
    }
}

/// Where a model configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    Recorded,
    Inferred,
}

impl WeightsFile {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The backbone configuration the tensors imply: base channels and input channels from
    /// `first_conv.weight` [base, in, 3, 3, 3], scales from the number of `left_blocks`.
    pub fn infer_backbone(&self) -> Option<FpnConfig> {
        let first = self.get(&format!("{BACKBONE_PREFIX}first_conv.weight"))?;
        if first.shape.len() != 5 {
            return None;
        }
        let lb = format!("{BACKBONE_PREFIX}left_blocks.");
        let left = self
            .entries
            .iter()
            .filter_map(|e| e.name.strip_prefix(&lb)?.split('.').next()?.parse::<usize>().ok())
            .max();
        Some(FpnConfig {
            in_channels: first.shape[1],
            base_channels: first.shape[0],
            num_scales: left.map_or(1, |i| i + 2),
        })
    }

    /// The projection head's output width (`head.6.weight` [proj_dim, dim]), where present.
    pub fn infer_proj_dim(&self) -> Option<usize> {
        self.get(&format!("{HEAD_PREFIX}6.weight")).and_then(|e| (e.shape.len() == 2).then_some(e.shape[0]))
    }

    /// A segmentation head's kind and class count from its tensors (read with
    /// `Naming::Literal`): the reference's `FPNLinearHead` (`layers.<i>.weight`
    /// [classes, channels(i), 1, 1, 1]) or `FPNNonLinearHead` (`final_block.weight` [classes, base, 1, 1, 1]).
    pub fn infer_head(&self) -> Option<(crate::eval::segment::HeadKind, usize)> {
        use crate::eval::segment::HeadKind;
        if let Some(e) = self.get("final_block.weight") {
            return Some((HeadKind::NonLinear, *e.shape.first()?));
        }
        self.get("layers.0.weight").map(|e| e.shape.first().map(|&k| (HeadKind::Linear, k)))?
    }

    /// The whole model around backbone `fpn`: the projection head's width from its tensors
    /// (else the default), the temperature the metadata records (else the default).
    pub fn model_config(&self, fpn: FpnConfig) -> crate::model::ModelConfig {
        let mut cfg = crate::model::ModelConfig { fpn, ..Default::default() };
        if let Some(p) = self.infer_proj_dim() {
            cfg.proj_dim = p;
        }
        if let Some(t) = self
            .metadata
            .get("model_config")
            .and_then(|mc| serde_json::from_str::<serde_json::Value>(mc).ok())
            .and_then(|v| v["temperature"].as_f64())
        {
            cfg.temperature = t;
        }
        cfg
    }

    /// The backbone configuration with where it came from: the metadata's `model_config`, else
    /// inferred from the tensors.
    pub fn backbone_config(&self) -> Result<Option<(FpnConfig, ConfigSource)>> {
        if let Some(mc) = self.metadata.get("model_config") {
            let v: serde_json::Value = serde_json::from_str(mc)
                .with_context(|| format!("{}: metadata model_config is not JSON", self.path.display()))?;
            let get = |k: &str| {
                v[k].as_u64()
                    .map(|x| x as usize)
                    .with_context(|| format!("{}: metadata model_config lacks {k}", self.path.display()))
            };
            let fpn = FpnConfig {
                in_channels: get("in_channels")?,
                base_channels: get("base_channels")?,
                num_scales: get("num_scales")?,
            };
            return Ok(Some((fpn, ConfigSource::Recorded)));
        }
        Ok(self.infer_backbone().map(|f| (f, ConfigSource::Inferred)))
    }

    /// One line on what the file is: container, Lightning, renamed prefixes, ignored tensors.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}{}",
            self.container,
            if self.lightning { ", a Lightning checkpoint (weights under state_dict)" } else { "" }
        );
        let mapped: Vec<String> = self
            .renamed
            .iter()
            .filter(|(from, to)| from != to)
            .map(
                |(from, to)| {
                    if from.is_empty() { format!("bare FPN3d keys -> {to:?}") } else { format!("{from:?} -> {to:?}") }
                },
            )
            .collect();
        if !mapped.is_empty() {
            s += &format!("; module prefixes {}", mapped.join(", "));
        }
        if !self.ignored.is_empty() {
            s += &format!("; {} tensors outside the model left out (first: {})", self.ignored.len(), self.ignored[0]);
        }
        s
    }
}

/// The backbone configuration to build for `file`, with `--base-channels` / `--num-scales`
/// given (Some) or not: the file's (recorded or inferred) configuration, which a flag must
/// agree with; the flags, else the reference's 16 x 6, when the file says nothing.
pub fn resolve_backbone(file: &WeightsFile, base: Option<usize>, scales: Option<usize>) -> Result<FpnConfig> {
    let Some((fpn, source)) = file.backbone_config()? else {
        return Ok(FpnConfig { in_channels: 1, base_channels: base.unwrap_or(16), num_scales: scales.unwrap_or(6) });
    };
    let how = match source {
        ConfigSource::Recorded => "as its metadata records",
        ConfigSource::Inferred => "as its tensors' names and shapes show",
    };
    for (flag, given, have) in [("--base-channels", base, fpn.base_channels), ("--num-scales", scales, fpn.num_scales)]
    {
        if let Some(g) = given {
            ensure!(
                g == have,
                "{flag} {g} contradicts {}: it holds an FPN3d of base {} x {} scales ({how}); leave {flag} out to use the file's",
                file.path.display(),
                fpn.base_channels,
                fpn.num_scales
            );
        }
    }
    Ok(fpn)
}
