//! The S3-Net network: stem, I-LKA residual blocks, auxiliary head, deformable conv, head.
//!
//! Parameters are plain tensors initialised from our own seeded generator rather than
//! libtorch's global one: several fits run at once in one process, and each must be
//! reproducible from its seed alone.
//!
//! **Stacks of networks.** [`S3Net::stack`] joins independently initialised networks into
//! one that trains all M of them at once: every parameter is concatenated along its first dimension,
//! the images ride side by side along the channel axis, `(1, M·C, S, S)`, and every
//! convolution runs with M times its groups, so no channel of one network ever sees another's.
//! BatchNorm normalises each channel on its own, hence each network exactly as alone. The
//! deformable conv views the features as M images with one kernel each. On a GPU one step of
//! M networks then costs the kernel launches of one (its arithmetic still grows with M: see
//! the README, "Batching jobs").

use s3net_ops::Then;
use tch::{Device, Kind, Tensor};

use crate::deform::{deform_conv2d, ConvGeometry};
use crate::options::{Kernels, OffsetMode, Precision};
use crate::rng::SplitMix64;

/// A convolution's weight and bias (of all stacked networks).
struct Conv {
    w: Tensor,
    b: Tensor,
    padding: i64,
    dilation: i64,
    /// Groups of one network; a stack of M runs with M times as many.
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

    /// The weight and bias in the activations' number format (the float32 leaves themselves
    /// when that is float32; otherwise a cast that autograd carries back).
    fn wb(&self, x: &Tensor) -> (Tensor, Tensor) {
        (self.w.to_kind(x.kind()), self.b.to_kind(x.kind()))
    }

    fn forward(&self, x: &Tensor, models: i64) -> Tensor {
        let (w, b) = self.wb(x);
        let ws = self.w.size();
        if models > 1 && self.groups == 1 && ws[2] == 1 && ws[3] == 1 && s3net_ops::gpu_paths(x.device()) {
            // A stack's 1×1 convs on a GPU as one batched GEMM, (M, O, C) × (N, M, C, H·W):
            // cuDNN's grouped convolution was 1.2–2.5× slower per step at 16–32 networks
            // (H200, `s3net bench fit --batch`).
            let xs = x.size();
            let (cin, cout) = (xs[1] / models, ws[0] / models);
            let y = w.reshape([models, cout, cin]).matmul(&x.reshape([xs[0], models, cin, xs[2] * xs[3]]));
            return (y + b.view([1, models, cout, 1])).view([xs[0], models * cout, xs[2], xs[3]]);
        }
        let (p, d) = ([self.padding, self.padding], [self.dilation, self.dilation]);
        if models > 1 && self.groups == 1 && x.device() == Device::Cpu && !s3net_ops::emulating_cuda() {
            // A CPU stack's dense convs network by network (the stem; the 1×1 convs too where
            // they are not ours: bfloat16 or tensor-op stacks): oneDNN's grouped convolution
            // adds in another order than the plain one, so a stacked network's first step
            // differed from the same network alone by rounding, and a later near-tie in an
            // argmax could flip (crates/model/tests/batch.rs). The stem has 3 input channels:
            // the cat costs little, and CPU stacks are an option, not the default.
            let (xs, ws, bs) = (x.chunk(models, 1), w.chunk(models, 0), b.chunk(models, 0));
            let ys: Vec<Tensor> = xs.iter().zip(&ws).zip(&bs).map(|((x, w), b)| x.conv2d(w, Some(b), [1, 1], p, d, 1)).collect();
            return Tensor::cat(&ys, 1);
        }
        x.conv2d(&w, Some(&b), [1, 1], p, d, self.groups * models)
    }

    /// Depthwise convs, the 1×1 convs of a stack on a GPU and every 1×1 conv on the CPU go
    /// through our own ops when asked: libtorch's CPU depthwise backward is 5–10× slower than
    /// the FLOPs warrant, its CUDA depthwise kernels ran an order of magnitude below the memory
    /// bandwidth at these shapes, cuBLAS ran a stack's 1×1 weight gradients as one long
    /// reduction per network, and oneDNN reordered every CPU 1×1 conv's maps into its own
    /// layout and back (see BENCHMARKS.md and README "Speed"; a lone network's 1×1 convs on a
    /// GPU are cuDNN's, which does well).
    /// If an op declines (a build without its kernel), libtorch's convolution runs instead.
    fn forward_with(&self, x: &Tensor, kernels: Kernels, models: i64) -> Tensor {
        if kernels == Kernels::Fused {
            let ws = self.w.size();
            let depthwise = self.groups > 1 && self.groups * models == ws[0];
            let ours = if depthwise && (x.device() == Device::Cpu || s3net_ops::cuda_compiled()) {
                let (w, b) = self.wb(x);
                Some(s3net_ops::depthwise_conv2d(x, &w, Some(&b), self.padding, self.dilation))
            } else if self.our_pointwise(x, models) {
                let (w, b) = self.wb(x);
                Some(s3net_ops::pointwise_conv2d(x, &w, Some(&b), models))
            } else if self.runs_as_columns(x, models) {
                self.as_columns(x, models)
            } else {
                None
            };
            if let Some(Ok(y)) = ours {
                return y;
            }
        }
        self.forward(x, models)
    }

    /// Whether this conv of `x` runs as columns through `s3net_ops::pointwise_conv2d` (see
    /// `s3net_ops::stem_columns`): a stack's dense k×k conv on a GPU with few input values per
    /// output (the stem: 3 channels × 3×3), 'same' size, when the switch is on.
    fn runs_as_columns(&self, x: &Tensor, models: i64) -> bool {
        let ws = self.w.size();
        let dense_kxk = self.groups == 1 && ws[2] == ws[3] && ws[2] > 1 && 2 * self.padding == self.dilation * (ws[2] - 1);
        dense_kxk && ws[1] * ws[2] * ws[3] <= STEM_COLUMNS_MAX && models > 1 && s3net_ops::gpu_paths(x.device()) && s3net_ops::stem_columns()
    }

    /// This conv as im2col's columns `(N, M·C·k², S²)` and a stacked 1×1 conv over them: the
    /// same sums (up to their order). None if libtorch's im2col declines.
    fn as_columns(&self, x: &Tensor, models: i64) -> Option<Result<Tensor, s3net_ops::OpError>> {
        let (w, b) = self.wb(x);
        let (xs, ws) = (x.size(), self.w.size());
        let k = ws[2];
        let cols = x.f_im2col([k, k], [self.dilation, self.dilation], [self.padding, self.padding], [1, 1]).ok()?;
        let cols = cols.view([xs[0], xs[1] * k * k, xs[2], xs[3]]);
        let w = w.reshape([ws[0], ws[1] * k * k, 1, 1]);
        Some(s3net_ops::pointwise_conv2d(&cols, &w, Some(&b), models))
    }

    /// Whether this conv of `x` is a 1×1 conv that runs as `s3net_ops::pointwise_conv2d` (with
    /// the fused kernels): a stack's on a GPU, every one on the CPU (see [`cpu_pointwise`]).
    fn our_pointwise(&self, x: &Tensor, models: i64) -> bool {
        let ws = self.w.size();
        let pointwise = self.groups == 1 && ws[2] == 1 && ws[3] == 1;
        pointwise && ((models > 1 && s3net_ops::gpu_paths(x.device())) || cpu_pointwise(x))
    }

    /// [`Conv::forward_with`], then `then` (`r + y` or `u · y`): one op where this 1×1 conv
    /// runs as ours and the switch allows (`s3net_ops::pointwise_conv2d_then`, the same bits),
    /// else the conv and libtorch's add or multiply.
    fn forward_then(&self, x: &Tensor, then: Then, kernels: Kernels, models: i64) -> Tensor {
        if kernels == Kernels::Fused && self.our_pointwise(x, models) && s3net_ops::fused_epilogues() {
            let (w, b) = self.wb(x);
            if let Ok(y) = s3net_ops::pointwise_conv2d_then(x, &w, Some(&b), models, Some(then)) {
                return y;
            }
        }
        let y = self.forward_with(x, kernels, models);
        match then {
            Then::Residual(r) => r + y,
            Then::Gate(u) => u * y,
        }
    }

    fn params(&self) -> [&Tensor; 2] {
        [&self.w, &self.b]
    }
    fn params_mut(&mut self) -> [&mut Tensor; 2] {
        [&mut self.w, &mut self.b]
    }
}

/// The most input values per output (channels × k²) a conv may have to run as columns (see
/// `Conv::runs_as_columns`): the stem's 27. A wider conv's columns would be large (the predicted
/// offsets' 3×3 conv over 32 channels: 288 values a pixel, 600 MB for 16 networks).
const STEM_COLUMNS_MAX: i64 = 64;

/// Whether a 1×1 conv of `x` runs as `s3net_ops::pointwise_conv2d`'s CPU kernel: float32 or
/// float64 maps on the CPU (not the emulated GPU paths). bfloat16 maps stay with oneDNN, whose
/// bfloat16 kernels the CPU kernel does not have.
fn cpu_pointwise(x: &Tensor) -> bool {
    x.device() == Device::Cpu && !s3net_ops::emulating_cuda() && matches!(x.kind(), Kind::Float | Kind::Double)
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
    /// Statistics per image: a batch of N is normalised as N separate images (the GPU runs an
    /// image and its transformed copy as one batch, and each must see its own statistics).
    /// With the fused kernels, `s3net_ops::plane_norm` (its own CUDA kernels on a GPU, this same
    /// libtorch BatchNorm elsewhere).
    fn forward(&self, x: &Tensor, k: Kernels) -> Tensor {
        if k == Kernels::Fused {
            if let Ok(y) = s3net_ops::plane_norm(x, &self.gamma, &self.beta, 1e-5) {
                return y;
            }
        }
        let n = x.size()[0];
        if n == 1 {
            return x.batch_norm(Some(&self.gamma), Some(&self.beta), None, None, true, 0.1, 1e-5, true);
        }
        let (g, b) = (self.gamma.repeat([n]), self.beta.repeat([n]));
        let y = x.flatten(0, 1).unsqueeze(0);
        y.batch_norm(Some(&g), Some(&b), None, None, true, 0.1, 1e-5, true).view(x.size().as_slice())
    }
    fn params(&self) -> [&Tensor; 2] {
        [&self.gamma, &self.beta]
    }
    fn params_mut(&mut self) -> [&mut Tensor; 2] {
        [&mut self.gamma, &mut self.beta]
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
    fn forward(&self, u: &Tensor, k: Kernels, m: i64) -> Tensor {
        let a = self.dw.forward_with(u, k, m);
        self.mix.forward_then(&self.branches(&a, k, m), Then::Gate(u), k, m)
    }

    /// The three parallel depthwise convs, concatenated per network: one op with the fused
    /// kernels (on a GPU it writes the concatenation directly), else three convs and a cat.
    fn branches(&self, a: &Tensor, k: Kernels, m: i64) -> Tensor {
        if k == Kernels::Fused && (a.device() == Device::Cpu || s3net_ops::cuda_compiled()) {
            let (w1, b1) = self.d1.wb(a);
            let (w2, b2) = self.d2.wb(a);
            let (w3, b3) = self.d3.wb(a);
            let br = |w, b, c: &Conv| s3net_ops::Branch { weight: w, bias: b, dilation: c.dilation };
            if let Ok(y) = s3net_ops::depthwise_branches(a, [br(&w1, &b1, &self.d1), br(&w2, &b2, &self.d2), br(&w3, &b3, &self.d3)], m) {
                return y;
            }
        }
        let branches = [self.d1.forward_with(a, k, m), self.d2.forward_with(a, k, m), self.d3.forward_with(a, k, m)];
        cat_per_model(&branches, m)
    }
    fn params(&self) -> Vec<&Tensor> {
        [&self.dw, &self.d1, &self.d2, &self.d3, &self.mix].into_iter().flat_map(|c| c.params()).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Tensor> {
        [&mut self.dw, &mut self.d1, &mut self.d2, &mut self.d3, &mut self.mix].into_iter().flat_map(|c| c.params_mut()).collect()
    }
}

/// Concatenates per-network channel blocks: with M stacked networks each tensor is
/// `(N, M·c, H, W)` and network j's blocks must end up together, `(N, M·Σc, H, W)`.
fn cat_per_model(parts: &[Tensor], models: i64) -> Tensor {
    if models == 1 {
        return Tensor::cat(parts, 1);
    }
    let split: Vec<Tensor> = parts
        .iter()
        .map(|t| {
            let s = t.size();
            t.reshape([s[0], models, s[1] / models, s[2], s[3]])
        })
        .collect();
    let c = Tensor::cat(&split, 2);
    let s = c.size();
    c.reshape([s[0], s[1] * s[2], s[3], s[4]])
}

/// `[1×1 → GELU → I-LKA → 1×1] + residual`, then BatchNorm.
struct Block {
    pw1: Conv,
    ilka: Ilka,
    pw2: Conv,
    bn: Bn,
}

impl Block {
    fn forward(&self, x: &Tensor, k: Kernels, m: i64) -> Tensor {
        let y = self.pw1.forward_with(x, k, m).gelu("none");
        let y = self.pw2.forward_then(&self.ilka.forward(&y, k, m), Then::Residual(x), k, m);
        self.bn.forward(&y, k)
    }
    fn params(&self) -> Vec<&Tensor> {
        let mut v: Vec<&Tensor> = self.pw1.params().into();
        v.extend(self.ilka.params());
        v.extend(self.pw2.params());
        v.extend(self.bn.params());
        v
    }
    fn params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v: Vec<&mut Tensor> = self.pw1.params_mut().into();
        v.extend(self.ilka.params_mut());
        v.extend(self.pw2.params_mut());
        v.extend(self.bn.params_mut());
        v
    }
}

/// Offsets and mask of the deformable conv.
enum Offsets {
    /// Zero-initialised conv 3×3 on the features → 2·9 offsets + 9 mask logits.
    Predicted(Conv),
    /// Free parameters (1, 18, S, S) and (1, 9, S, S) — the authors' variant — per network.
    Free { offset: Tensor, mask: Tensor },
}

/// The whole network, or a stack of M networks of the same shape trained side by side.
/// `features` is both the feature width F and the cluster count K.
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
    /// The activations' number format: the input is cast to it on the way in; the response
    /// and auxiliary maps come out in it (the loss terms add in float32 whatever it is).
    act: Kind,
    /// Networks in this stack (1 for a plain network).
    models: i64,
    features: i64,
}

impl S3Net {
    /// Builds a freshly initialised network; every parameter requires grad.
    #[allow(clippy::too_many_arguments)]
    pub fn new(seed: u64, dev: Device, cin: i64, f: i64, blocks: usize, offsets: OffsetMode, size: i64, kernels: Kernels, precision: Precision) -> Self {
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
            act: precision.kind(),
            models: 1,
            features: f,
        };
        net.make_trainable();
        net
    }

    /// Readies every parameter for training: channels-last conv weights with the tensor-op
    /// kernels (to match the activations), and `requires_grad` on each leaf.
    fn make_trainable(&self) {
        for p in self.parameters() {
            if p.dim() == 4 && self.kernels == Kernels::TensorOps {
                let cl = crate::fit::channels_last(p);
                crate::fit::no_grad(|| {
                    let mut p = p.shallow_clone();
                    p.set_data(&cl);
                });
            }
            let _ = p.set_requires_grad(true);
        }
    }

    /// Appends the networks of `other` (same F, blocks, offsets, size, kernels and input
    /// channels) to this stack, which then trains them all at once, each keeping its own
    /// weights. The parameters become new leaves holding copies. The copies are made before
    /// anything changes, so a libtorch failure (out of memory) leaves this stack as it was.
    pub fn stack(&mut self, other: S3Net) {
        let joined: Vec<Tensor> = self
            .parameters()
            .iter()
            .zip(other.parameters())
            .map(|(a, b)| crate::fit::no_grad(|| Tensor::cat(&[a.detach(), b.detach()], 0)))
            .collect();
        for (slot, t) in self.parameters_mut().into_iter().zip(joined) {
            *slot = t;
        }
        self.models += other.models;
        self.make_trainable();
    }

    /// Keeps only the networks at `keep` (indices into this stack, in the order given) and
    /// drops the rest, e.g. the ones whose fit has finished. Parameters become new leaves.
    pub fn retain(&mut self, keep: &[i64]) {
        let models = self.models;
        let picked: Vec<Tensor> = self.parameters().iter().map(|p| select_models(p, models, keep)).collect();
        for (slot, t) in self.parameters_mut().into_iter().zip(picked) {
            *slot = t;
        }
        self.models = keep.len() as i64;
        self.make_trainable();
    }

    /// Networks in this stack.
    pub fn models(&self) -> i64 {
        self.models
    }

    /// Every trainable tensor, in a fixed order; with M networks each one's first dimension
    /// holds M equal blocks, network j's at block j.
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

    /// Where the free offsets and mask sit in [`parameters`](Self::parameters) (offsets, then
    /// mask), so that they can train at their own learning rate
    /// ([`FitOptions::offset_lr`](crate::FitOptions::offset_lr)); None with predicted offsets.
    pub fn free_sampling_params(&self) -> Option<std::ops::Range<usize>> {
        match &self.offsets {
            Offsets::Free { .. } => {
                let blocks: usize = self.blocks.iter().map(|b| b.params().len()).sum();
                let before = self.stem.params().len() + self.stem_bn.params().len() + blocks + self.aux.params().len() + self.aux_bn.params().len();
                Some(before..before + 2)
            }
            Offsets::Predicted(_) => None,
        }
    }

    /// The same tensors as [`parameters`](Self::parameters), in the same order, to replace.
    fn parameters_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v: Vec<&mut Tensor> = Vec::new();
        v.extend(self.stem.params_mut());
        v.extend(self.stem_bn.params_mut());
        for b in &mut self.blocks {
            v.extend(b.params_mut());
        }
        v.extend(self.aux.params_mut());
        v.extend(self.aux_bn.params_mut());
        match &mut self.offsets {
            Offsets::Predicted(c) => v.extend(c.params_mut()),
            Offsets::Free { offset, mask } => v.extend([offset, mask]),
        }
        v.extend(self.dcn.params_mut());
        v.extend(self.dcn_bn.params_mut());
        v.extend(self.head.params_mut());
        v.extend(self.head_bn.params_mut());
        v
    }

    /// Stem and attention blocks: the shared trunk, `(N, M·C, S, S) → (N, M·F, S, S)` for a
    /// stack of M networks (network j reads channels `j·C..(j+1)·C`).
    pub fn trunk(&self, x: &Tensor) -> Tensor {
        let m = self.models;
        let x = x.to_kind(self.act);
        let mut h = self.stem_bn.forward(&self.stem.forward_with(&x, self.kernels, m), self.kernels).relu();
        for b in &self.blocks {
            h = b.forward(&h, self.kernels, m);
        }
        h
    }

    /// The auxiliary head used by the affine-consistency term, in the activations' format.
    pub fn aux(&self, feat: &Tensor) -> Tensor {
        self.aux_bn.forward(&self.aux.forward_with(feat, self.kernels, self.models), self.kernels)
    }

    /// Deformable conv and the final 1×1: the response map `(N, M·K, S, S)`, in the
    /// activations' format.
    pub fn response(&self, feat: &Tensor) -> Tensor {
        let (m, f) = (self.models, self.features);
        let size = feat.size();
        let (n, s) = (size[0], (size[2], size[3]));
        // The deformable conv sees N·M images of F channels, image n·M + j belonging to
        // network j, each with network j's offsets and kernel.
        let images = if m == 1 { feat.shallow_clone() } else { feat.reshape([n * m, f, s.0, s.1]) };
        let (offset, mask) = match &self.offsets {
            Offsets::Predicted(c) => {
                let om = c.forward(feat, m).reshape([n * m, 27, s.0, s.1]);
                (om.narrow(1, 0, 18), om.narrow(1, 18, 9).sigmoid())
            }
            Offsets::Free { offset, mask } => (repeat_batch(offset, n), repeat_batch(&mask.sigmoid(), n)),
        };
        let (w, b) = if m == 1 {
            (self.dcn.w.shallow_clone(), self.dcn.b.shallow_clone())
        } else {
            let ws = self.dcn.w.size();
            let w = self.dcn.w.reshape([m, f, ws[1], ws[2], ws[3]]);
            (repeat_batch(&w, n), repeat_batch(&self.dcn.b.view([m, f]), n))
        };
        // The deformable conv's sampling positions are float32 whatever the activations (in
        // bfloat16 they would be off by whole pixels): the offsets, mask and kernel go in as
        // the float32 they are (predicted offsets widened), the features in the activations'
        // format. The fused op on a GPU keeps bfloat16 features and columns as such; its CPU
        // version and the tensor-op one compute on float32 copies. The result comes back in the
        // activations' format.
        let (offset, mask) = (offset.to_kind(Kind::Float), mask.to_kind(Kind::Float));
        let geo = ConvGeometry::same(3);
        let fused = match self.kernels {
            // The fused op runs on CPU, and on CUDA when this build carries its CUDA kernel;
            // otherwise (or if it declines) the tensor ops run.
            Kernels::Fused if feat.device() == Device::Cpu || s3net_ops::cuda_compiled() => {
                s3net_ops::deform_conv2d(&images, &offset, Some(&mask), &w, Some(&b), geo.stride, geo.padding, geo.dilation)
                    .ok()
            }
            _ => None,
        };
        let h = fused.unwrap_or_else(|| {
            deform_conv2d(&images, &offset, Some(&mask), &w, Some(&b), geo)
                .expect("deform_conv2d shapes are fixed by construction")
        });
        let h = if m == 1 { h } else { h.reshape([n, m * f, s.0, s.1]) }.to_kind(self.act);
        let h = self.dcn_bn.forward(&h, self.kernels).relu();
        self.head_bn.forward(&self.head.forward_with(&h, self.kernels, m), self.kernels)
    }
}

/// `t` repeated `n` times along its first dimension (a view when `n` is 1).
fn repeat_batch(t: &Tensor, n: i64) -> Tensor {
    if n == 1 {
        return t.shallow_clone();
    }
    let mut reps = vec![1; t.dim()];
    reps[0] = n;
    t.repeat(reps)
}

/// The blocks of networks `keep` from a parameter stacked over `models` networks.
pub(crate) fn select_models(p: &Tensor, models: i64, keep: &[i64]) -> Tensor {
    crate::fit::no_grad(|| {
        let size = p.size();
        let per = size[0] / models;
        let idx = Tensor::from_slice(keep).to_device(p.device());
        let mut out = size.clone();
        out[0] = per * keep.len() as i64;
        p.detach().reshape([models, -1]).index_select(0, &idx).reshape(out.as_slice())
    })
}
