//! The S3-Net network: stem, I-LKA residual blocks, auxiliary head, deformable conv, head.
//!
//! Parameters are plain tensors initialised from our own seeded generator rather than
//! libtorch's global one: several fits run at once in one process, and each must be
//! reproducible from its seed alone.

use tch::{Device, Kind, Tensor};

use crate::deform::{deform_conv2d, ConvGeometry};
use crate::options::{Kernels, OffsetMode};
use crate::rng::SplitMix64;

/// A convolution's weight and bias.
struct Conv {
    w: Tensor,
    b: Tensor,
    padding: i64,
    dilation: i64,
    groups: i64,
}

impl Conv {
    /// PyTorch's default initialisation: uniform in ±1/√fan_in for weight and bias.
    fn new(rng: &mut SplitMix64, dev: Device, cin: i64, cout: i64, k: i64, groups: i64) -> Self {
        let fan_in = (cin / groups) * k * k;
        let bound = 1.0 / (fan_in as f64).sqrt();
        Conv {
            w: rng.uniform_tensor(&[cout, cin / groups, k, k], bound, dev),
            b: rng.uniform_tensor(&[cout], bound, dev),
            padding: k / 2,
            dilation: 1,
            groups,
        }
    }

    /// A depthwise conv with 'same' padding for the given dilation.
    fn depthwise(rng: &mut SplitMix64, dev: Device, ch: i64, k: i64, dilation: i64) -> Self {
        let mut c = Conv::new(rng, dev, ch, ch, k, ch);
        c.dilation = dilation;
        c.padding = dilation * (k - 1) / 2;
        c
    }

    fn zeros(dev: Device, cin: i64, cout: i64, k: i64) -> Self {
        let opts = (Kind::Float, dev);
        Conv {
            w: Tensor::zeros([cout, cin, k, k], opts),
            b: Tensor::zeros([cout], opts),
            padding: k / 2,
            dilation: 1,
            groups: 1,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.w, Some(&self.b), [1, 1], [self.padding, self.padding], [self.dilation, self.dilation], self.groups)
    }

    /// Depthwise convs go through our C++ kernel on CPU when asked: libtorch's CPU depthwise
    /// backward is 5–10× slower than the FLOPs warrant (see BENCHMARKS.md).
    fn forward_with(&self, x: &Tensor, kernels: Kernels) -> Tensor {
        let depthwise = self.groups > 1 && self.groups == self.w.size()[0];
        if kernels == Kernels::Fused && depthwise && x.device() == Device::Cpu {
            if let Ok(y) = s3net_ops::depthwise_conv2d(x, &self.w, Some(&self.b), self.padding, self.dilation) {
                return y;
            }
        }
        self.forward(x)
    }

    fn params(&self) -> [&Tensor; 2] {
        [&self.w, &self.b]
    }
}

/// BatchNorm in training mode (batch statistics), affine.
struct Bn {
    gamma: Tensor,
    beta: Tensor,
}

impl Bn {
    fn new(dev: Device, ch: i64) -> Self {
        Bn { gamma: Tensor::ones([ch], (Kind::Float, dev)), beta: Tensor::zeros([ch], (Kind::Float, dev)) }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(Some(&self.gamma), Some(&self.beta), None, None, true, 0.1, 1e-5, true)
    }
    fn params(&self) -> [&Tensor; 2] {
        [&self.gamma, &self.beta]
    }
}

/// Inception large-kernel attention: depthwise 5×5, then parallel depthwise 3×3 d1, 5×5 d2 and
/// 7×7 d3, concatenated and mixed by a 1×1 conv; the result gates the input (no sigmoid).
struct Ilka {
    dw: Conv,
    d1: Conv,
    d2: Conv,
    d3: Conv,
    mix: Conv,
}

impl Ilka {
    fn new(rng: &mut SplitMix64, dev: Device, f: i64) -> Self {
        Ilka {
            dw: Conv::depthwise(rng, dev, f, 5, 1),
            d1: Conv::depthwise(rng, dev, f, 3, 1),
            d2: Conv::depthwise(rng, dev, f, 5, 2),
            d3: Conv::depthwise(rng, dev, f, 7, 3),
            mix: Conv::new(rng, dev, 3 * f, f, 1, 1),
        }
    }
    fn forward(&self, u: &Tensor, k: Kernels) -> Tensor {
        let a = self.dw.forward_with(u, k);
        let cat = Tensor::cat(&[self.d1.forward_with(&a, k), self.d2.forward_with(&a, k), self.d3.forward_with(&a, k)], 1);
        u * self.mix.forward(&cat)
    }
    fn params(&self) -> Vec<&Tensor> {
        [&self.dw, &self.d1, &self.d2, &self.d3, &self.mix].iter().flat_map(|c| c.params()).collect()
    }
}

/// `[1×1 → GELU → I-LKA → 1×1] + residual`, then BatchNorm.
struct Block {
    pw1: Conv,
    ilka: Ilka,
    pw2: Conv,
    bn: Bn,
}

impl Block {
    fn forward(&self, x: &Tensor, k: Kernels) -> Tensor {
        let y = self.pw1.forward(x).gelu("none");
        let y = self.pw2.forward(&self.ilka.forward(&y, k));
        self.bn.forward(&(x + y))
    }
    fn params(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self.pw1.params().into();
        v.extend(self.ilka.params());
        v.extend(self.pw2.params());
        v.extend(self.bn.params());
        v
    }
}

/// Offsets and mask of the deformable conv.
enum Offsets {
    /// Zero-initialised conv 3×3 on the features → 2·9 offsets + 9 mask logits.
    Predicted(Conv),
    /// Free parameters (1, 18, S, S) and (1, 9, S, S) — the authors' variant.
    Free { offset: Tensor, mask: Tensor },
}

/// The whole network. `features` is both the feature width F and the cluster count K.
pub struct S3Net {
    stem: Conv,
    stem_bn: Bn,
    blocks: Vec<Block>,
    aux: Conv,
    aux_bn: Bn,
    offsets: Offsets,
    dcn: Conv,
    dcn_bn: Bn,
    head: Conv,
    head_bn: Bn,
    kernels: Kernels,
}

impl S3Net {
    /// Builds a freshly initialised network; every parameter requires grad.
    #[allow(clippy::too_many_arguments)]
    pub fn new(seed: u64, dev: Device, cin: i64, f: i64, blocks: usize, offsets: OffsetMode, size: i64, kernels: Kernels) -> Self {
        let mut rng = SplitMix64::new(seed);
        let stem = Conv::new(&mut rng, dev, cin, f, 3, 1);
        let blocks = (0..blocks)
            .map(|_| Block {
                pw1: Conv::new(&mut rng, dev, f, f, 1, 1),
                ilka: Ilka::new(&mut rng, dev, f),
                pw2: Conv::new(&mut rng, dev, f, f, 1, 1),
                bn: Bn::new(dev, f),
            })
            .collect();
        let aux = Conv::new(&mut rng, dev, f, f, 1, 1);
        let offsets = match offsets {
            OffsetMode::Predicted => Offsets::Predicted(Conv::zeros(dev, f, 27, 3)),
            OffsetMode::Free => Offsets::Free {
                offset: Tensor::zeros([1, 18, size, size], (Kind::Float, dev)),
                mask: Tensor::zeros([1, 9, size, size], (Kind::Float, dev)),
            },
        };
        let dcn = Conv::new(&mut rng, dev, f, f, 3, 1);
        let head = Conv::new(&mut rng, dev, f, f, 1, 1);
        let net = S3Net {
            stem,
            stem_bn: Bn::new(dev, f),
            blocks,
            aux,
            aux_bn: Bn::new(dev, f),
            offsets,
            dcn,
            dcn_bn: Bn::new(dev, f),
            head,
            head_bn: Bn::new(dev, f),
            kernels,
        };
        for p in net.parameters() {
            if p.dim() == 4 && kernels == Kernels::TensorOps {
                // Conv weights in channels-last layout too, to match the activations.
                let cl = crate::fit::channels_last(p);
                tch::no_grad(|| {
                    let mut p = p.shallow_clone();
                    p.set_data(&cl);
                });
            }
            // Leaf tensors: make them trainable in place.
            let _ = p.set_requires_grad(true);
        }
        net
    }

    /// Every trainable tensor, in a fixed order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = Vec::new();
        v.extend(self.stem.params());
        v.extend(self.stem_bn.params());
        for b in &self.blocks {
            v.extend(b.params());
        }
        v.extend(self.aux.params());
        v.extend(self.aux_bn.params());
        match &self.offsets {
            Offsets::Predicted(c) => v.extend(c.params()),
            Offsets::Free { offset, mask } => v.extend([offset, mask]),
        }
        v.extend(self.dcn.params());
        v.extend(self.dcn_bn.params());
        v.extend(self.head.params());
        v.extend(self.head_bn.params());
        v
    }

    /// Stem and attention blocks: the shared trunk, `(N, C, S, S) → (N, F, S, S)`.
    pub fn trunk(&self, x: &Tensor) -> Tensor {
        let mut h = self.stem_bn.forward(&self.stem.forward(x)).relu();
        for b in &self.blocks {
            h = b.forward(&h, self.kernels);
        }
        h
    }

    /// The auxiliary head used by the affine-consistency term.
    pub fn aux(&self, feat: &Tensor) -> Tensor {
        self.aux_bn.forward(&self.aux.forward(feat))
    }

    /// Deformable conv and the final 1×1: the response map `(N, K, S, S)`.
    pub fn response(&self, feat: &Tensor) -> Tensor {
        let (offset, mask) = match &self.offsets {
            Offsets::Predicted(c) => {
                let om = c.forward(feat);
                (om.narrow(1, 0, 18), om.narrow(1, 18, 9).sigmoid())
            }
            Offsets::Free { offset, mask } => {
                let n = feat.size()[0];
                (offset.expand([n, -1, -1, -1], false), mask.sigmoid().expand([n, -1, -1, -1], false))
            }
        };
        let geo = ConvGeometry::same(3);
        let fused = match self.kernels {
            // The fused op runs on CPU, and on CUDA when this build carries its CUDA kernel;
            // otherwise (or if it declines) the tensor ops run.
            Kernels::Fused if feat.device() == Device::Cpu || s3net_ops::cuda_compiled() => s3net_ops::deform_conv2d(
                feat, &offset, Some(&mask), &self.dcn.w, Some(&self.dcn.b), geo.stride, geo.padding, geo.dilation,
            )
            .ok(),
            _ => None,
        };
        let h = fused.unwrap_or_else(|| {
            deform_conv2d(feat, &offset, Some(&mask), &self.dcn.w, Some(&self.dcn.b), geo)
                .expect("deform_conv2d shapes are fixed by construction")
        });
        let h = self.dcn_bn.forward(&h).relu();
        self.head_bn.forward(&self.head.forward(&h))
    }
}
