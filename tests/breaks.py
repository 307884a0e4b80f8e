"""The deliberate breaks of docs/GUARANTEES.md's newest table: apply each to its file, run its test(s), expect a
failure, restore the file. A break whose pattern is gone (the code moved) is reported, never skipped silently.

    .venv/bin/python tests/breaks.py [INDEX ...] > runs/breaks.log     (all of them, or the given ones)

It edits the checkout it runs in: run it in a clone (with its own .venv) that nothing else uses meanwhile."""
import json
import subprocess
import sys
import time
from pathlib import Path

T = "tests/"
BREAKS = [
    # (description, file, old, new, [tests])
    ("the loop ignores the run folder's checkpoint (resume off, every trainer)", "trainers/trainer.py",
     "ckpt = find_checkpoint(self.out, who=self.who)", "ckpt = None",
     [T + "test_resume.py::test_reward_sigkill_at_a_random_step_resumes_exactly",
      T + "test_resume.py::test_grpo_sigkill_at_a_random_iteration_resumes_exactly",
      T + "test_resume.py::test_sft_sigkill_at_a_random_step_resumes_exactly",
      T + "test_trainer.py::test_a_stopped_run_resumes_to_the_same_weights_and_records"]),
    ("no evaluation at the last step", "trainers/trainer.py",
     "return self.step % self.cfg.eval_every == 0 or self.step == self.total_steps",
     "return self.step % self.cfg.eval_every == 0", [T + "test_trainer.py::test_cadence_of_records_evaluations_and_checkpoints"]),
    ("a time budget ends without the final evaluation", "trainers/trainer.py",
     "        if not _evaluated(self.last):", "        if False:",
     [T + "test_trainer.py::test_the_time_budget_ends_with_an_evaluated_exported_partial_result"]),
    ("torn checkpoints accepted", "spatialcore/checkpoint.py",
     '    """Why checkpoint folder ``path`` is incomplete (naming the file), or None when it is complete."""',
     '    """Why checkpoint folder ``path`` is incomplete (naming the file), or None when it is complete."""\n    return None',
     [T + "test_resume.py::test_torn_checkpoints_fall_back_or_fail_naming_the_file"]),
    ("checkpoint written in place", "spatialcore/checkpoint.py", "    with atomic_dir(final) as tmp:",
     "    import contextlib\n    final.mkdir(parents=True, exist_ok=True)\n    with contextlib.nullcontext(final) as tmp:",
     [T + "test_resume.py::test_kill_during_a_checkpoint_write_leaves_the_previous_one"]),
    ("grpo: micro-batch loss weighted by the local kept count", "trainers/grpo.py",
     "w = rows.numel() / n_kept_global / T", "w = rows.numel() / Bk / T",
     [T + "test_equivalence.py::test_grpo_same_gradient_on_one_rank_two_nodes_and_with_accumulation"]),
    ("reward: gradients summed over ranks", "trainers/reward.py", "(loss / self.accum).backward()",
     "(loss / self.accum * self.world).backward()", [T + "test_equivalence.py::test_reward_two_ranks"]),
    ("reward: accumulation not divided", "trainers/reward.py", "(loss / self.accum).backward()", "loss.backward()",
     [T + "test_equivalence.py::test_reward_gradient_accumulation"]),
    ("reward: the rate is not set from the step (stays at the first step's)", "trainers/reward.py",
     "lr = set_lr(self.opt, cfg.optim, self.step, cfg.max_steps)", "lr = self.opt.param_groups[0]['lr']",
     [T + "test_reward.py::test_the_trainers_rate_is_the_schedules_at_every_step"]),
    ("NCCL-only process group on CUDA", "spatialcore/dist.py",
     'return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"', 'return "nccl" if device_type == "cuda" else "gloo"',
     [T + "test_equivalence.py::test_the_cuda_process_group_serves_host_tensors"]),
    ("global batch not divided by the world size", "spatialcore/dist.py", "    if global_batch % world:", "    if False:",
     [T + "test_equivalence.py::test_a_global_batch_that_does_not_divide_fails_before_any_model"]),
    ("checkpoint written during a bad-reward streak", "trainers/grpo.py", "return not self.bad_streak", "return True",
     [T + "test_grpo.py::test_nonfinite_rewards_train_on_the_rest_and_a_bad_streak_stops"]),
    ("non-finite rewards reach the logged reward statistics", "trainers/grpo.py",
     "finite = rewards[torch.isfinite(rewards)]", "finite = rewards.reshape(-1)",
     [T + "test_grpo.py::test_nonfinite_rewards_train_on_the_rest_and_a_bad_streak_stops"]),
    ("the trainer applies G/4 Top-k on top of any preset", "trainers/grpo.py",
     'return preset_top_k(self.advantage, self.group_size) if self.top_k == "preset" else self.top_k',
     'return preset_top_k("spatial_rl", self.group_size) if self.top_k in ("preset", None) else self.top_k',
     [T + "test_grpo.py::test_nonfinite_rewards_train_on_the_rest_and_a_bad_streak_stops"]),
    ("zero-std groups kept", "trainers/grpo.py", "rank_by=rank_by, drop_zero_std=cfg.drop_zero_std,",
     "rank_by=rank_by, drop_zero_std=False,", [T + "test_grpo.py::test_nonfinite_rewards_train_on_the_rest_and_a_bad_streak_stops"]),
    ("reward: non-finite loss not checked", "trainers/reward.py", "if not torch.isfinite(loss):", "if False:",
     [T + "test_reward.py::test_a_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint"]),
    ("LoRA scale halved in the export (alpha metadata)", "spatialcore/rl/policy.py",
     'config = self.transformer.peft_config["default"].to_dict()',
     'config = self.transformer.peft_config["default"].to_dict()\n            config["lora_alpha"] /= 2',
     [T + "test_grpo.py::test_lora_export_round_trip"]),
    ("merged export without the adapter delta", "spatialcore/rl/policy.py",
     "merged = value + deltas[key].to(value.dtype) if key in deltas else value", "merged = value",
     [T + "test_grpo.py::test_lora_export_round_trip"]),
    ("single-row batch not padded", "spatialcore/rl/sampler.py", "        if B == 1:", "        if False:",
     [T + "test_grpo.py::test_sampling_is_a_function_of_the_seed"]),
    ("a single row runs the whole transformer twice", "spatialcore/rl/sampler.py",
     "                return self._forward(model, x, sigma, emb, pooled)",
     "                return self._forward(model, x.expand(2, *x.shape[1:]), sigma, emb.expand(2, *emb.shape[1:]), "
     "pooled.expand(2, *pooled.shape[1:]))[:1]",
     [T + "test_grpo.py::test_a_single_row_duplicates_only_the_conditioning_not_the_tokens"]),
    ("dropped samples forwarded too", "trainers/grpo.py", "idx = keep.nonzero().squeeze(1)",
     "idx = torch.arange(keep.numel(), device=keep.device)", [T + "test_grpo.py::test_gradient_equals_kept_only_reference"]),
    ("CPS log-prob always Gaussian", "spatialcore/rl/sampler.py",
     'return "mse" if self.sde_type == "cps" and self.cps_logprob == "flow_grpo" else "gaussian"', 'return "gaussian"',
     [T + "test_grpo.py::test_cps_logprob_convention_is_a_sampler_key"]),
    ("flow_grpo preset with per-group std", "kernels/advantages.py", '"flow_grpo": {"std": "batch"',
     '"flow_grpo": {"std": "group"', [T + "test_advantages.py::test_preset_flow_grpo_formula"]),
    ("sample CLI without the --model path check", "spatialcore/cli/sample.py",
     '    require(args.model, "--model", "flux", hub=True)', "", [T + "test_reward.py::test_wrong_paths_are_one_line_with_exit_2"]),
    ("diffusers' deprecated torch_dtype", "spatialcore/rl/sampler.py",
     "pipe = FluxPipeline.from_pretrained(path, dtype=dtype)", "pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype)",
     [T + "test_cli.py::test_no_deprecation_warnings_from_our_calls"]),
    ("flat keys of the former GRPO config no longer name their new place", "trainers/grpo.py",
     "    RENAMED: ClassVar[dict[str, str]] = {", "    RENAMED: ClassVar[dict[str, str]] = {} and {",
     [T + "test_grpo.py::test_config_errors_name_the_key"]),
    ("sft resume without the VAE's measured shift/scale", "trainers/sft.py",
     "        self.vae.register_to_config(shift_factor=shift, scaling_factor=scale)", "",
     [T + "test_resume.py::test_sft_sigkill_at_a_random_step_resumes_exactly"]),
    ("sft gradients not all-reduced over ranks", "trainers/sft.py", "            all_reduce_grads(self.params, self.world)",
     "            pass", [T + "test_equivalence.py::test_sft_same_update_on_one_rank_two_ranks_and_with_accumulation"]),
    ("sft micro-batch loss divided by its own size", "trainers/sft.py", "(part / B).backward()",
     "(part / len(ids)).backward()", [T + "test_equivalence.py::test_sft_same_update_on_one_rank_two_ranks_and_with_accumulation"]),
    ("sft export drops the LoRA delta", "spatialcore/rl/policy.py",
     "state = merged_state_dict(tr) if policy.lora_rank else",
     "state = {k.replace('.base_layer.', '.'): v for k, v in tr.state_dict().items() if '.lora_' not in k} if policy.lora_rank else",
     [T + "test_sft.py::test_the_checkpoint_loads_in_the_stock_pipeline_and_its_lora_matches"]),
    ("over-long prompts no longer refused", "spatialcore/rl/sampler.py", "            if n > limit:", "            if False:",
     [T + "test_sft.py::test_a_prompt_longer_than_max_sequence_length_is_refused_not_cut"]),
    ("sigma-aware Top-k ranks by the reward (rank_by ignored)", "kernels/advantages.py",
     "keep = topk_keep(rank_by.reshape(r.shape).float(), top_k)", "keep = topk_keep(r.float(), top_k)",
     [T + "test_grpo.py::test_sigma_aware_top_k_ranks_by_the_lower_bound"]),
    ("the trainer ignores reward.spatialscore.topk_by", "trainers/grpo.py",
     "self.lcb_topk = self.top_k is not None and", "self.lcb_topk = False and",
     [T + "test_grpo.py::test_trainer_keeps_the_lower_bound_top_k"]),
    ("policy.export_dtype ignored (pipeline saved as trained)", "spatialcore/rl/policy.py",
     "        pipe = copy.deepcopy(pipe).to(dtype)  # the live", "        pass  # the live",
     [T + "test_sft.py::test_float16_export_halves_the_files_and_loads_as_float32"]),
    ("exports in the training dtype, not the base's", "spatialcore/rl/policy.py",
     "    return stored_dtype(model) or getattr(torch, train_dtype)", "    return getattr(torch, train_dtype)",
     [T + "test_grpo.py::test_the_export_is_in_the_base_dtype_and_loads_in_stock_diffusers"]),
    ("held-out sampling ignores sample_batch", "spatialcore/eval/heldout.py", "    chunk = batch or max(1, len(mine))",
     "    chunk = max(1, len(mine))", [T + "test_grpo.py::test_every_sampler_call_is_bounded_by_sample_batch"]),
    ("the text-embedding cache grows without bound", "spatialcore/rl/sampler.py",
     "        while len(self._text_cache) > self.cfg.text_cache:", "        while False:",
     [T + "test_grpo.py::test_the_text_embedding_cache_is_bounded"]),
    ("the model returns a log-variance without a variance head", "spatialcore/reward/model.py",
     "        return mu, log_var if self.variance_head else None", "        return mu, log_var",
     [T + "test_reward.py::test_the_variance_head_is_the_models_to_say"]),
    ("a sigma-aware reward accepted with a SpatialScore without a variance head", "trainers/grpo.py",
     "    if not has_sigma:", "    if False:", [T + "test_grpo.py::test_sigma_aware_reward_refuses_a_model_without_a_variance_head"]),
    ("run.json not written", "spatialcore/run_folder.py", "        record_start(out, world)", "        pass",
     [T + "test_run_folder.py::test_rerun_refused_resumed_or_started_fresh"]),
    ("the oracle scores an image by its prompt's first relation only", "spatialcore/data/oracle.py",
     "verdicts = judge(image, prompt_relations(prompt))", "verdicts = judge(image, prompt_relations(prompt)[:1])",
     [T + "test_reward.py::test_reward_eval_with_the_pixel_oracle_by_value"]),
    ("a stage's max_stage_steps ignored", "trainers/reward.py", 'rules.get("max_stage_steps", float("inf"))',
     'float("inf")', [T + "test_reward.py::test_a_stage_ends_at_its_own_threshold_or_its_step_limit"]),
    ("a stage's own advance_at ignored", "trainers/reward.py", 'rules.get("advance_at", d.advance_at)', "d.advance_at",
     [T + "test_reward.py::test_a_stage_ends_at_its_own_threshold_or_its_step_limit"]),
    ("the demo hands Spatial-RL its raw threads=0", "spatialcore/demo.py",
     '"threads": cfg.grpo.threads or threads, "seed": cfg.seed}', '"threads": cfg.grpo.threads, "seed": cfg.seed}',
     [T + "test_demo.py::test_demo_runs_every_stage_and_reports"]),
    ("the evaluation report imports the RL reward functions again (a layer up)", "spatialcore/reward/evaluate.py",
     "from ..data.oracle import relations_true", "from ..rl.reward_fns import relations_true",
     [T + "test_layout.py::test_imports_follow_the_layers"]),
    ("import cycle: the scene module imports the renderer again (lazily)", "spatialcore/data/scene.py",
     "from __future__ import annotations\n", "from __future__ import annotations\n\n\ndef _cycle():\n    from . import render  # noqa: F401\n",
     [T + "test_layout.py::test_no_import_cycles"]),
    ("the reward config's flat keys no longer name their new place", "trainers/reward.py",
     'for k in ("lr", "head_lr", "weight_decay"', 'for k in ("head_lr", "weight_decay"',
     [T + "test_reward.py::test_wrong_paths_are_one_line_with_exit_2"]),
    ("a help example using a flat reward key (refused now)", "spatialcore/cli/reward.py",
     '"optim.warmup_steps=5 eval_every=10', '"warmup_steps=5 eval_every=10',
     [T + "test_cli_examples.py::test_every_example_runs_as_printed"]),
    ("a help text changed without regenerating docs/CONFIG.md", "trainers/optim.py",
     'help="linear warm-up from lr / warmup_steps to lr"', 'help="linear warm-up"',
     [T + "test_config.py::test_config_reference_is_current"]),
    ("extends merges shallowly", "spatialcore/config.py",
     "        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v", "        out[k] = v",
     [T + "test_config.py::test_extends_lays_a_file_over_another"]),
    ("auto backend picks Triton for CPU tensors", "kernels/launch.py",
     'return "triton" if t.is_cuda and HAS_TRITON else "torch"', 'return "triton" if HAS_TRITON else "torch"',
     [T + "test_kernel_launch.py::test_backend_names"]),
    ("gpu_check.sh without PYTHONSAFEPATH", "profiling/gpu_check.sh", "export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1",
     "export PYTHONUNBUFFERED=1",
     [T + "test_gpu_check.py::test_rehearsal_of_the_cheapest_steps"]),
    ("nft: the old policy not restored on a resume", "trainers/nft.py",
     "                self.old[n].copy_(tensors[f\"old.{n}\"])", "                pass",
     [T + "test_nft.py::test_a_stopped_run_resumes_with_its_old_policy"]),
    ("nft: the micro-batch loss weighted by the local kept count", "trainers/nft.py",
     "w = rows.numel() / n_kept / K", "w = rows.numel() / idx.numel() / K",
     [T + "test_nft.py::test_the_same_update_on_one_rank_with_accumulation_and_on_two_nodes"]),
    ("nft: the negative policy mixed as (1 - beta) v_old + beta v_theta", "trainers/nft.py",
     "negative = weighted((1 + beta) * v_old - beta * v_theta)", "negative = weighted((1 - beta) * v_old + beta * v_theta)",
     [T + "test_nft.py::test_the_loss_is_the_sources_formula"]),
    ("nft: no adaptive weighting", "trainers/nft.py", "        return ((err ** 2) / w).mean(dims).float()",
     "        return (err ** 2).mean(dims).float()", [T + "test_nft.py::test_the_loss_is_the_sources_formula"]),
    ("sft: trainable text encoders left out of the checkpoint", "trainers/sft.py",
     "        tensors.update({n: p.detach() for n, p in self.text_params.items()})\n", "",
     [T + "test_sft.py::test_trainable_text_encoders_train_resume_and_export"]),
    ("captions: a wrong caption keeps the relation (the replacement draws from all four directions)",
     "spatialcore/data/captions.py", "    other = [d for d in DIRECTIONS if d != rel]", "    other = list(DIRECTIONS)",
     [T + "test_sft.py::test_web_like_captions_drop_or_replace_the_relation_at_their_rates"]),
    ("the saddle guard never restarts", "trainers/reward.py", "        if not d.saddle_guard or self.stage == 0:",
     "        if True:", [T + "test_reward.py::test_the_saddle_guard_restarts_a_collapsed_stage"]),
    ("no ramp after a stage switch", "trainers/reward.py",
     "        if self.warm_from >= 0 and cfg.data.stage_warmup and", "        if False and cfg.data.stage_warmup and",
     [T + "test_reward.py::test_the_saddle_guard_restarts_a_collapsed_stage"]),
    ("auto picks the Triton SDE step on CUDA (measured slower than the compiled reference)", "kernels/launch.py",
     '"sde_step": "compiled",', '"sde_step": "triton",',
     [T + "test_kernel_launch.py::test_auto_on_cuda_is_the_faster_measured_path"]),
    ("fsdp2: gradients averaged over ranks, not summed", "trainers/grpo.py",
     "grad_scale=tr.world if tr.fsdp else 1.0", "grad_scale=1.0",
     [T + "test_equivalence.py::test_grpo_fsdp2_full_fine_tuning_equals_one_rank_and_resumes_across_rank_counts"]),
    ("fsdp2: the root stays gathered after its forward", "spatialcore/fsdp.py",
     "fully_shard(model, reshard_after_forward=True)", "fully_shard(model)",
     [T + "test_equivalence.py::test_grpo_fsdp2_full_fine_tuning_equals_one_rank_and_resumes_across_rank_counts"]),
    ("fsdp2: a rank that kept fewer rows runs fewer micro-batches", "trainers/grpo.py",
     "        chunks += [None] * (micro_steps - len(chunks))", "        chunks += []",
     [T + "test_equivalence.py::test_grpo_fsdp2_lora_with_a_rank_that_kept_nothing"]),
    ("fsdp2: held-out sampling not in step", "spatialcore/eval/heldout.py", "    if lockstep:", "    if False:",
     [T + "test_equivalence.py::test_grpo_fsdp2_lora_with_a_rank_that_kept_nothing"]),
    ("fsdp2: the sharded optimizer state not restored", "trainers/grpo.py",
     "            load_optimizer_state(self.policy.transformer, self.opt, named_optimizer_state(state[\"optimizer\"], names))",
     "            pass",
     [T + "test_equivalence.py::test_grpo_fsdp2_lora_with_a_rank_that_kept_nothing"]),
    ("bench grpo: the micro-step's FLOPs not divided by its rows", "profiling/bench.py",
     "    return counter.get_total_flops() / rows", "    return counter.get_total_flops()",
     [T + "test_bench_profile.py::test_grpo_flop_count_of_one_micro_step_scales_to_the_whole_update"]),
    ("bench grpo: the FLOPs not scaled by the trained timesteps", "profiling/bench.py",
     "        flops = [per_row_step * k * T for k in kept]", "        flops = [per_row_step * k for k in kept]",
     [T + "test_bench_profile.py::test_bench_suite_writes_json_and_markdown[grpo]"]),
    ("advantages rows kernel: each program starts at its own index, not its tile's", "kernels/advantages.py",
     "rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)", "rows = tl.program_id(0) + tl.arange(0, ROWS)",
     [T + "test_advantages.py::test_many_small_groups_several_per_program"]),
    ("GRPO loss kernel: the kept count off by one", "kernels/grpo_loss.py",
     "tl.store(NKEPT, n.to(tl.int64))", "tl.store(NKEPT, (n + 1).to(tl.int64))",
     [T + "test_grpo_loss.py"]),
    ("SDE step kernel: sigmas shared by the batch ignore sigma_max at the first step", "kernels/sde_step.py",
     "                smax = smax_f", "                smax = tn_f",
     [T + "test_sde_step.py::test_triton_first_step_uses_sigma_max"]),
    ("eval: the order of a directional relation judged without its sign", "spatialcore/eval/report.py",
     "order += int(d[want_axis] * sign > 0)", "order += int(d[want_axis] > 0)",
     [T + "test_eval.py::test_axis_and_order_separates_a_swapped_pair_from_a_wrong_axis"]),
    ("probe: the label is not the subject (every other prompt)", "spatialcore/eval/probe.py",
     "label.append(float(objects[0].colour == colour))", "label.append(float(j % 2))",
     [T + "test_probe.py::test_the_committed_generators_text_path_knows_the_subject"]),
    ("export: an sft checkpoint's trained text encoders left out", "spatialcore/export.py",
     "            if names[0] in tensors:", "            if False:",
     [T + "test_sft.py::test_trainable_text_encoders_train_resume_and_export"]),
    ("export: no spatialcore_run.json beside an exported sft checkpoint", "spatialcore/export.py",
     '    (out / "spatialcore_run.json").write_text', '    (out / "ignored.json").write_text',
     [T + "test_sft.py::test_trainable_text_encoders_train_resume_and_export"]),
]


def main() -> int:
    only = set(sys.argv[1:])
    results = []
    for i, (what, file, old, new, tests) in enumerate(BREAKS):
        if only and str(i) not in only:
            continue
        path = Path(file)
        text = path.read_text()
        if old not in text:
            results.append({"break": what, "file": file, "error": "pattern not found"})
            print(f"[{i}] {what}: PATTERN NOT FOUND in {file}", flush=True)
            continue
        path.write_text(text.replace(old, new, 1))
        try:
            t0 = time.time()
            out = {}
            for test in tests:
                r = subprocess.run([".venv/bin/python", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
                                   capture_output=True, text=True, timeout=1500)
                out[test] = "FAILED (as it must)" if r.returncode != 0 else "PASSED (the break went unnoticed)"
                if r.returncode != 0 and "no tests ran" in r.stdout + r.stderr:
                    out[test] = "NO TEST RAN"
        finally:
            path.write_text(text)
        results.append({"break": what, "file": file, "tests": out, "seconds": round(time.time() - t0)})
        print(f"[{i}] {what} ({file}): {out}", flush=True)
    Path("runs").mkdir(exist_ok=True)
    Path("runs/breaks.json").write_text(json.dumps(results, indent=1))
    bad = [r for r in results if "error" in r or any(v != "FAILED (as it must)" for v in r["tests"].values())]
    print(f"{len(results) - len(bad)} of {len(results)} breaks caught; not caught: {[r['break'] for r in bad]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
