"""The mutants of ``tools/mutation_check.py``: each a small change of DINO's meaning (an exact source fragment of a
library file and its replacement) and the tests that must kill it."""

from __future__ import annotations

from dataclasses import dataclass

TRAIN = "tests/train/test_dino_semantics.py"
MODEL = "tests/model/test_dino_semantics_model.py"
EVAL = "tests/eval/test_eval_semantics.py"
DATA = "tests/data/test_relayout_semantics.py"
RECIPE = "tests/data/test_recipe_semantics.py"
RNG = "tests/runtime/test_rng_semantics.py"


@dataclass(frozen=True)
class Mutant:
    """One change of meaning: ``pattern`` (occurring exactly once in ``file``) becomes ``replacement``."""

    name: str
    file: str
    pattern: str
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files expected to kill it
    ci: bool = False  # part of the fixed subset that CI runs


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "head_without_l2_norm",
        "utils/model/vit.py",
        "x = F.normalize(self.mlp(x), dim=-1, p=2)",
        "x = self.mlp(x)",
        (f"{MODEL}::test_head_last_layer_gets_the_l2_normalised_bottleneck",),
        ci=True,
    ),
    Mutant(
        "intermediate_layers_without_final_norm",
        "utils/model/vit.py",
        "outputs.append(self.norm(x))",
        "outputs.append(x)",
        (f"{MODEL}::test_intermediate_layers_are_the_last_blocks_through_the_final_norm",),
        ci=True,
    ),
    Mutant(
        "last_layer_never_frozen",
        "utils/train/optim.py",
        "if epoch >= freeze_last_layer:",
        "if True:",
        (f"{TRAIN}::test_last_layer_is_frozen_during_the_first_epochs",),
        ci=True,
    ),
    Mutant(
        "weight_decay_on_biases_and_norms",
        "utils/train/optim.py",
        'name.endswith(".bias") or param.ndim <= 1',
        "False",
        (f"{TRAIN}::test_parameter_groups_follow_the_official_weight_decay_rule",),
        ci=True,
    ),
    Mutant(
        "centre_not_subtracted",
        "utils/train/loss.py",
        "teacher_logits = (teacher_output - self.center).div_(",
        "teacher_logits = (teacher_output + 0 * self.center).div_(",
        (f"{TRAIN}::test_loss_and_centre_equal_the_official_dino_loss",),
        ci=True,
    ),
    Mutant(
        "centre_momentum_swapped",
        "utils/train/loss.py",
        "self.center * self.center_momentum + batch_center * (1 - self.center_momentum)",
        "self.center * (1 - self.center_momentum) + batch_center * self.center_momentum",
        (f"{TRAIN}::test_centre_is_an_ema_of_the_teacher_batch_mean",),
        ci=True,
    ),
    Mutant(
        "student_temperature_doubled",
        "utils/train/loss.py",
        "logits = student_output * (1.0 / student_temp)",
        "logits = student_output * (0.5 / student_temp)",
        (f"{TRAIN}::test_loss_and_centre_equal_the_official_dino_loss",),
    ),
    Mutant(
        "no_teacher_temperature_warmup",
        "utils/train/schedules.py",
        "np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)",
        "np.linspace(teacher_temp, teacher_temp, warmup_epochs)",
        (f"{TRAIN}::test_loss_and_centre_equal_the_official_dino_loss",),
    ),
    Mutant(
        "same_view_pairs_not_skipped",
        "utils/train/loss.py",
        "pairs = 1.0 - torch.eye(",
        "pairs = 1.0 - 0.0 * torch.eye(",
        (f"{TRAIN}::test_loss_and_centre_equal_the_official_dino_loss",),
    ),
    Mutant(
        "teacher_takes_gradients",
        "utils/model/vit.py",
        "p.requires_grad_(False)",
        "p.requires_grad_(True)",
        (f"{TRAIN}::test_teacher_takes_no_gradient_in_a_step",),
    ),
    Mutant(
        "drop_path_in_teacher",
        "utils/model/vit.py",
        "build_backbone(args.arch, args.patch_size, args.global_crop_size, 0.0)",
        "build_backbone(args.arch, args.patch_size, args.global_crop_size, args.drop_path_rate)",
        (f"{MODEL}::test_teacher_has_no_stochastic_depth",),
    ),
    Mutant(
        "ema_weight_inverted",
        "utils/train/optim.py",
        "torch._foreach_lerp_(teacher_params, student_params, [student_weight] * len(teacher_params))",
        "torch._foreach_lerp_(teacher_params, student_params, [1 - student_weight] * len(teacher_params))",
        (f"{TRAIN}::test_teacher_is_the_official_ema_of_the_student",),
        ci=True,
    ),
    Mutant(
        "lr_not_scaled_by_global_batch",
        "utils/train/run.py",
        "args.lr * global_batch / 256.0",
        "args.lr",
        (f"{TRAIN}::test_lr_is_scaled_by_the_global_batch",),
    ),
    Mutant(
        "sinkhorn_without_prototype_balance",
        "utils/train/loss.py",
        "log_q -= _global_logsumexp(log_q, dim=0) + math.log(log_q.shape[1])",
        "log_q -= math.log(log_q.shape[1])",
        ("tests/train/test_loss.py::test_sinkhorn_knopp_equals_dinov2_rule",),
    ),
    Mutant(
        "lr_ignores_world_size",
        "utils/train/run.py",
        "global_batch = args.batch_size_per_gpu * self.ctx.world_size",
        "global_batch = args.batch_size_per_gpu",
        (f"{TRAIN}::test_peak_lr_counts_every_process_in_the_global_batch",),
    ),
    Mutant(
        "cosine_end_value",
        "utils/train/schedules.py",
        "cosine = final_value + 0.5 * (base_value - final_value)",
        "cosine = 0.0 + 0.5 * (base_value - final_value)",
        (f"{TRAIN}::test_cosine_scheduler_equals_the_official_formula",),
    ),
    Mutant(
        "momentum_schedule_reversed",
        "utils/train/schedules.py",
        "(1.0 - momentum_teacher) * 0.5 * (1 + np.cos(np.pi * phase))",
        "(1.0 - momentum_teacher) * 0.5 * (1 - np.cos(np.pi * phase))",
        (f"{TRAIN}::test_teacher_momentum_schedule_closed_form",),
    ),
    Mutant(
        "gradient_clipping_skipped",
        "utils/train/optim.py",
        "if max_norm <= 0:",
        "if max_norm <= 1e30:",
        (f"{TRAIN}::test_gradient_clipping_bounds_every_parameter_update",),
        ci=True,
    ),
    Mutant(
        "blur_global_view_1_not_always",
        "utils/data/augment/per_image.py",
        "RandomGaussianBlur(1.0, *sigma)",
        "RandomGaussianBlur(0.5, *sigma)",
        (RECIPE,),
    ),
    Mutant(
        "blur_global_view_2_p05",
        "utils/data/augment/per_image.py",
        "RandomGaussianBlur(0.1, *sigma)",
        "RandomGaussianBlur(0.5, *sigma)",
        (RECIPE,),
    ),
    Mutant(
        "blur_local_views_p01",
        "utils/data/augment/per_image.py",
        "RandomGaussianBlur(0.5, *sigma), normalize()",
        "RandomGaussianBlur(0.1, *sigma), normalize()",
        (RECIPE,),
    ),
    Mutant(
        "blur_sigma_ignored_by_the_batched_path",
        "utils/data/augment/batched.py",
        'blur = {"sigma_range": cfg.blur_sigma}',
        'blur = {"sigma_range": (0.1, 2.0)}',
        ("tests/data/test_augment.py::test_blur_sigma_range_reaches_both_paths_and_defaults_to_the_official_one",),
    ),
    Mutant(
        "no_solarisation",
        "utils/data/augment/per_image.py",
        "RandomSolarize(0.2)",
        "RandomSolarize(0.0)",
        (RECIPE,),
    ),
    Mutant(
        "knn_temperature_doubled",
        "utils/eval/knn.py",
        "logits = values / T",
        "logits = values / (2 * T)",
        (f"{EVAL}::test_knn_temperature_decides_a_hand_computed_vote",),
        ci=True,
    ),
    Mutant(
        "knn_uniform_votes",
        "utils/eval/knn.py",
        "return (logits - logits.max(dim=1, keepdim=True).values).exp_()",
        "return torch.ones_like(values)",
        (f"{EVAL}::test_knn_scores_are_the_official_weighted_votes",),
    ),
    Mutant(
        "knn_top5_counts_zero_vote_classes",
        "utils/eval/knn.py",
        "maxk = min(MAX_TOPK, k, num_classes)",
        "maxk = min(MAX_TOPK, num_classes)",
        (f"{EVAL}::test_knn_top5_with_one_neighbour_counts_only_the_voted_class",),
    ),
    Mutant(
        "linear_probe_ignores_n_last_blocks",
        "eval_linear.py",
        "TokenFeatures(n_last_blocks=args.n_last_blocks,",
        "TokenFeatures(n_last_blocks=1,",
        (f"{EVAL}::test_linear_probe_features_follow_n_last_blocks_and_avgpool",),
    ),
    Mutant(
        "linear_probe_ignores_avgpool",
        "eval_linear.py",
        "avgpool_patchtokens=args.avgpool_patchtokens)",
        "avgpool_patchtokens=False)",
        (f"{EVAL}::test_linear_probe_features_follow_n_last_blocks_and_avgpool",),
    ),
    Mutant(
        "token_features_one_block_repeated",
        "utils/eval/features.py",
        "blocks = model.get_intermediate_layers(images, self.n_last_blocks)",
        "blocks = model.get_intermediate_layers(images, 1) * self.n_last_blocks",
        (f"{EVAL}::test_linear_probe_features_follow_n_last_blocks_and_avgpool",),
    ),
    Mutant(
        "token_features_avgpool_includes_cls",
        "utils/eval/features.py",
        "parts.append(blocks[-1][:, prefix:].mean(dim=1))",
        "parts.append(blocks[-1].mean(dim=1))",
        (f"{EVAL}::test_linear_probe_features_follow_n_last_blocks_and_avgpool",),
    ),
    Mutant(
        "val_relayout_wrong_column",
        "utils/data/tinyimagenet.py",
        "fname, wnid = fields[0].strip(), fields[1].strip()",
        "fname, wnid = fields[0].strip(), fields[-1].strip()",
        (DATA,),
        ci=True,
    ),
    Mutant(
        "checkpoint_rng_not_restored",
        "utils/train/run.py",
        "restore_rng_state(self._rng_to_restore)",
        "pass",
        (f"{RNG}::test_resumed_run_equals_the_uninterrupted_run",),
    ),
    Mutant(
        "rng_torch_state_not_restored",
        "utils/runtime/rng.py",
        'torch.set_rng_state(state["torch"])',
        "torch.get_rng_state()",
        (f"{RNG}::test_saved_rng_state_restores_every_random_stream",),
        ci=True,
    ),
)
