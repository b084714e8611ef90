//! What plugins that hand training to an external launcher (LLaMA-Factory,
//! FlagEmbedding under torchrun) share: the DeepSpeed ZeRO config the
//! Reinforced-IR authors trained both models with (`stage1.json`).

/// A DeepSpeed ZeRO config for the Hugging Face Trainer integration: the
/// given stage (1 shards the optimizer states), batch sizes, accumulation,
/// clipping and fp16/bf16 left `"auto"` so the Trainer's own arguments
/// (`per_device_train_batch_size`, `gradient_accumulation_steps`, `fp16`,
/// `bf16`) decide them, as the examples of both projects do.
pub fn deepspeed_zero_config(stage: u8) -> String {
    format!(
        r#"{{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "zero_allow_untested_optimizer": true,
  "fp16": {{ "enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1 }},
  "bf16": {{ "enabled": "auto" }},
  "zero_optimization": {{
    "stage": {stage},
    "allgather_partitions": true,
    "allgather_bucket_size": 500000000,
    "overlap_comm": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 500000000,
    "contiguous_gradients": true
  }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_config_names_its_stage() {
        let c = super::deepspeed_zero_config(1);
        assert!(c.contains("\"stage\": 1,") && c.contains("\"train_micro_batch_size_per_gpu\": \"auto\""));
    }
}
