//! The typed kernel registry: every kernel of `kernels/*.cu` is a variant of [`KernelId`]; the
//! device resolves all of them once, when it opens (a missing symbol is an error then, not
//! in the middle of a step), and a launch indexes a table — no string lookups in hot loops.

use crate::tensor::DType;

macro_rules! kernels {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// One kernel of the embedded fatbin.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum KernelId { $($variant),* }

        impl KernelId {
            /// Every kernel, in table order.
            pub const ALL: &'static [KernelId] = &[$(KernelId::$variant),*];
            /// The kernel's symbol in the fatbin.
            pub fn name(self) -> &'static str {
                const NAMES: &[&str] = &[$($name),*];
                NAMES[self as usize]
            }

            /// The kernel's sm_90 machine code summary (`crate::kernels::sass`), looked up by
            /// name once for every kernel.
            pub fn sass(self) -> Option<&'static crate::cuda::sass::Kernel> {
                static TABLE: std::sync::OnceLock<Vec<Option<&'static crate::cuda::sass::Kernel>>> = std::sync::OnceLock::new();
                TABLE.get_or_init(|| KernelId::ALL.iter().map(|k| crate::kernels::sass_of(k.name())).collect())[self as usize]
            }
        }
    };
}

kernels! {
    // elementwise.cu
    CastF32ToBf16 => "cast_f32_to_bf16",
    CastBf16ToF32 => "cast_bf16_to_f32",
    FillF32 => "fill_f32",
    ScaleByScalarF32 => "scale_by_scalar_f32",
    ReluForwardF32 => "relu_forward_f32",
    ReluForwardBf16 => "relu_forward_bf16",
    ReluBackwardF32 => "relu_backward_f32",
    ReluBackwardBf16 => "relu_backward_bf16",
    AddF32 => "add_f32",
    AddBf16 => "add_bf16",
    ReluForwardF32x4 => "relu_forward_f32x4",
    ReluForwardBf16x8 => "relu_forward_bf16x8",
    ReluBackwardF32x4 => "relu_backward_f32x4",
    ReluBackwardBf16x8 => "relu_backward_bf16x8",
    AddF32x4 => "add_f32x4",
    AddBf16x8 => "add_bf16x8",
    // conv3d.cu
    Conv3dForwardF32 => "conv3d_forward_f32",
    Conv3dForwardBf16 => "conv3d_forward_bf16",
    Conv3dForwardK3C1F32 => "conv3d_forward_k3_c1_f32",
    Conv3dForwardK3C1Bf16 => "conv3d_forward_k3_c1_bf16",
    Conv3dBackwardInputF32 => "conv3d_backward_input_f32",
    Conv3dBackwardInputBf16 => "conv3d_backward_input_bf16",
    Conv3dBackwardWeightF32 => "conv3d_backward_weight_f32",
    Conv3dBackwardWeightBf16 => "conv3d_backward_weight_bf16",
    Conv3dReduceSplits => "conv3d_reduce_splits",
    Conv3dReduceSplitsF32x4 => "conv3d_reduce_splits_f32x4",
    // conv3d_tc.cu (tensor cores, bf16)
    Conv3dTcForwardCo16K1C16 => "conv3d_tc_forward_co16_k1_c16",
    Conv3dTcForwardCo16K1C32 => "conv3d_tc_forward_co16_k1_c32",
    Conv3dTcForwardCo16K3C16 => "conv3d_tc_forward_co16_k3_c16",
    Conv3dTcForwardCo16K3C32 => "conv3d_tc_forward_co16_k3_c32",
    Conv3dTcForwardCo32K1C16 => "conv3d_tc_forward_co32_k1_c16",
    Conv3dTcForwardCo32K1C32 => "conv3d_tc_forward_co32_k1_c32",
    Conv3dTcForwardCo32K3C16 => "conv3d_tc_forward_co32_k3_c16",
    Conv3dTcForwardCo32K3C32 => "conv3d_tc_forward_co32_k3_c32",
    Conv3dTcForwardCo64K1C16 => "conv3d_tc_forward_co64_k1_c16",
    Conv3dTcForwardCo64K1C32 => "conv3d_tc_forward_co64_k1_c32",
    Conv3dTcForwardCo64K3C16 => "conv3d_tc_forward_co64_k3_c16",
    Conv3dTcForwardCo64K3C32 => "conv3d_tc_forward_co64_k3_c32",
    Conv3dTcBackwardWeightK1 => "conv3d_tc_backward_weight_k1",
    Conv3dTcBackwardWeightK3 => "conv3d_tc_backward_weight_k3",
    Conv3dTcBackwardWeightK3Any => "conv3d_tc_backward_weight_k3_any",
    Conv3dWeightToBf16 => "conv3d_weight_to_bf16",
    // mma_probe.cu
    MmaLayoutProbe => "mma_layout_probe",
    // reduce.cu
    ColPartialsF32 => "col_partials_f32",
    ColPartialsBf16 => "col_partials_bf16",
    ReduceChunks => "reduce_chunks",
    // batchnorm.cu
    BnTrainFinalize => "bn_train_finalize",
    BnEvalStats => "bn_eval_stats",
    BnAffineTable => "bn_affine_table",
    BnApplyF32 => "bn_apply_f32",
    BnApplyBf16 => "bn_apply_bf16",
    BnApplyF32x4 => "bn_apply_f32x4",
    BnApplyBf16x8 => "bn_apply_bf16x8",
    BnTableReluBf16 => "bn_table_relu_bf16",
    BnBackwardFinalize => "bn_backward_finalize",
    BnBackwardApplyF32 => "bn_backward_apply_f32",
    BnBackwardApplyBf16 => "bn_backward_apply_bf16",
    BnBackwardApplyF32x4 => "bn_backward_apply_f32x4",
    BnBackwardApplyBf16x8 => "bn_backward_apply_bf16x8",
    // pooling.cu
    Maxpool2ForwardF32 => "maxpool2_forward_f32",
    Maxpool2ForwardBf16 => "maxpool2_forward_bf16",
    Maxpool2ForwardF32x4 => "maxpool2_forward_f32x4",
    Maxpool2ForwardBf16x8 => "maxpool2_forward_bf16x8",
    Maxpool2BackwardF32 => "maxpool2_backward_f32",
    Maxpool2BackwardBf16 => "maxpool2_backward_bf16",
    Maxpool2BackwardF32x4 => "maxpool2_backward_f32x4",
    Maxpool2BackwardBf16x8 => "maxpool2_backward_bf16x8",
    // upsample.cu
    Upsample2ForwardF32 => "upsample2_forward_f32",
    Upsample2ForwardBf16 => "upsample2_forward_bf16",
    Upsample2ForwardF32x4 => "upsample2_forward_f32x4",
    Upsample2ForwardBf16x8 => "upsample2_forward_bf16x8",
    Upsample2BackwardF32 => "upsample2_backward_f32",
    Upsample2BackwardBf16 => "upsample2_backward_bf16",
    Upsample2BackwardF32x4 => "upsample2_backward_f32x4",
    Upsample2BackwardBf16x8 => "upsample2_backward_bf16x8",
    // gather.cu
    GatherRowsF32 => "gather_rows_f32",
    GatherRowsBf16 => "gather_rows_bf16",
    ScatterSegmentsF32 => "scatter_segments_f32",
    ScatterSegmentsBf16 => "scatter_segments_bf16",
    CopyCols => "copy_cols",
    PadChannelsBf16 => "pad_channels_bf16",
    // normalize.cu
    L2NormalizeForward => "l2_normalize_forward",
    L2NormalizeBackward => "l2_normalize_backward",
    // linear.cu
    FillRows => "fill_rows",
    // infonce.cu
    InfonceRowLse => "infonce_row_lse",
    InfonceLoss => "infonce_loss",
    InfonceBackwardD128 => "infonce_backward_d128",
    InfonceBackwardD512 => "infonce_backward_d512",
    InfonceSignalHits => "infonce_signal_hits",
    InfonceSignalFinalize => "infonce_signal_finalize",
    // infonce_tc.cu (tensor cores, bf16x3)
    InfonceSplitBf16 => "infonce_split_bf16",
    InfonceTcRowLse => "infonce_tc_row_lse",
    InfonceTcBackward => "infonce_tc_backward",
    // segloss.cu
    SeglossPartialsF32 => "segloss_partials_f32",
    SeglossPartialsBf16 => "segloss_partials_bf16",
    SeglossFinalize => "segloss_finalize",
    SeglossBackwardF32 => "segloss_backward_f32",
    SeglossBackwardBf16 => "segloss_backward_bf16",
    // stitch.cu
    StitchWindowF32 => "stitch_window_f32",
    StitchWindowBf16 => "stitch_window_bf16",
    BlendWindowF32 => "blend_window_f32",
    BlendWindowBf16 => "blend_window_bf16",
    BlendNormalize => "blend_normalize",
    // optim.cu
    MultiSumsq => "multi_sumsq",
    ClipFinalize => "clip_finalize",
    MultiAdam => "multi_adam",
}

impl KernelId {
    /// The variant of a kernel templated on the activation type: `f32` for F32 storage,
    /// `bf16` for BF16.
    pub fn typed(dtype: DType, f32: KernelId, bf16: KernelId) -> KernelId {
        match dtype {
            DType::BF16 => bf16,
            _ => f32,
        }
    }
}
