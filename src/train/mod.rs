//! Pretraining: the step (`step`), the run loop around it (`run`), its record (`metrics`),
//! what it watches (`monitor`), batches outside the sampler (`batches`) and the CPU memory
//! estimate (`budget`).

mod batches;
mod budget;
mod metrics;
mod monitor;
mod run;
mod step;

pub use batches::{BatchShape, dump_batch, synthetic_batch};
pub use budget::{CPU_FIXED_BYTES, CpuStepEstimate, available_memory_bytes, estimate_cpu_step};
pub use metrics::{CHECKPOINT_FILE, LOSS_CURVE_FILE, METRICS_FILE, RunSummary, truncate_metrics, write_loss_curve};
pub use monitor::{OnlineProbe, Validation, online_probe, validate};
pub use run::{
    BatchSource, Progress, Resume, STOP_REQUESTED, Silent, TrainOptions, run_pretraining, run_pretraining_ranked,
    stop_on_signal,
};
pub use step::{
    DeviceStepStats, MAX_GRAD_NORM, PRETRAIN_GRAPH, StepStats, broadcast_slots, pretrain_step, pretrain_step_cuda,
    pretrain_step_cuda_ranked, pretrain_step_ranked,
};
