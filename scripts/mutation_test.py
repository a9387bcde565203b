"""Mutation testing: seed one small bug at a time and check that the test suite catches it.

Each mutant replaces one exact snippet of one file with a wrong version, in a temporary copy of the
repository (the working tree is never touched), and runs the test files that guard that code with
`pytest -x -q`. A mutant is caught when the tests fail. The script prints a table and the total
time, and exits non-zero when a mutant survives, when a snippet is no longer found (so the list
cannot rot silently when the code changes), or when the unmutated tests do not pass.

    python scripts/mutation_test.py                    # every mutant
    python scripts/mutation_test.py --only selection   # mutants whose name or file contains a word
    python scripts/mutation_test.py --list             # the mutants, without running anything
    python scripts/mutation_test.py --jobs 2           # two mutants at a time, each in its own copy

A full run (69 mutants, after a baseline run of their tests) took 118 s wall with `--jobs 2` on an otherwise idle
2-core machine: 68 caught, and the 69th, a snippet that had moved, caught once updated.

To add a mutant, append a `Mutant` to MUTANTS: the file, the exact snippet (it must occur once), its
wrong version and the tests (files or node ids) that should catch it.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


T_SCORING = "tests/test_scoring.py"
T_SELECTION = "tests/test_selection.py"
T_EDITOR = "tests/test_editor.py"
T_EVAL = "tests/test_evaluation.py"
T_METRIC = "tests/test_safeground_metric.py"
T_BASELINES = "tests/test_baselines.py"
T_SCALE = "tests/test_scale.py"
T_PADDING = "tests/test_padding.py"
T_ITERATIVE = "tests/test_iterative.py"
T_STOPPING = "tests/test_stopping.py"
T_PROTOCOL = "tests/test_protocol.py"
T_LAYOUT = "tests/test_layout.py"
T_TEXT_ONLY = "tests/test_text_only.py"
LITERAL = f"{T_SCORING}::test_scores_match_literal_formula"
EPS_TEST = f"{T_SCORING}::test_zero_safe_activation_is_clamped_at_eps"
APPLY_TEST = f"{T_EDITOR}::test_apply_scales_selected_weights_and_revert_is_bit_exact"

MUTANTS = [
    # --- iterative attribution and its stopping rule -----------------------------------------------
    Mutant("stop keeps the round that spent the budget", "hf_uwm/methods/stopping.py",
           "return step.round - 1, BUDGET_REACHED", "return step.round, BUDGET_REACHED", (T_STOPPING,)),
    Mutant("a cost equal to the budget counts as spent", "hf_uwm/methods/stopping.py",
           'step.cost > max(knowledge_budget, step.measures.get("cost_resolution", 0))',
           'step.cost >= max(knowledge_budget, step.measures.get("cost_resolution", 0))', (T_STOPPING,)),
    Mutant("a cost within the measure's resolution stops the edit", "hf_uwm/methods/stopping.py",
           'step.cost > max(knowledge_budget, step.measures.get("cost_resolution", 0))',
           "step.cost > knowledge_budget", (T_STOPPING,)),
    Mutant("copies of a caption are told apart in the slice", "hf_uwm/methods/held_out.py",
           "caption_ids = torch.arange(h) if caption_ids is None else caption_ids", "caption_ids = torch.arange(h)",
           (T_STOPPING,)),
    Mutant("the vocabulary keeps words only one caption of a pair uses", "hf_uwm/methods/held_out.py",
           "if both[w] > one[w] and", "if both[w] + one[w] > 0 and", (T_STOPPING,)),
    Mutant("vocabulary shift without the half", "hf_uwm/methods/held_out.py",
           '"vocabulary_shift": float(100 * 0.5 * (p - q).abs().sum(1).mean())',
           '"vocabulary_shift": float(100 * (p - q).abs().sum(1).mean())', (T_STOPPING,)),
    Mutant("a tiny slice is not refused", "hf_uwm/methods/held_out.py",
           "    if held < MIN_HELD_OUT:\n", "    if held < 0:\n", (T_STOPPING,)),
    Mutant("GS per concept over every row", "hf_uwm/evaluation.py",
           'subsets = {f"concept {c}": [x == c for x in concepts]', 'subsets = {f"concept {c}": [True for x in concepts]',
           (T_EVAL,)),
    Mutant("held-out rows feed the gradients", "hf_uwm/methods/rounds.py",
           "train = run.subset(kept_rows) if held_rows else run", "train = run",
           (f"{T_STOPPING}::test_the_held_out_slice_never_enters_a_backward_pass",)),
    Mutant("trajectory lost on resume", "hf_uwm/methods/rounds.py",
           'steps = from_records(json.loads(meta.get("trajectory", "[]"))) or []', "steps = []",
           (f"{T_STOPPING}::test_a_resumed_run_stops_at_the_same_round",)),
    Mutant("knowledge cost from the captions' side", "hf_uwm/methods/held_out.py",
           '"agreement": "agreement", "rougeL"', '"agreement": "agreement_text", "rougeL"', (T_STOPPING,)),
    Mutant("images embedded again every round", "hf_uwm/methods/pair_images.py",
           'if getattr(run, "image_embeddings", None) is None:', "if True:",
           (f"{T_STOPPING}::test_images_are_embedded_once_when_no_vision_weight_is_edited",)),
    Mutant("curvature never refreshed after round 1", "hf_uwm/methods/rounds.py",
           "(round_index - 1) % cfg.curvature_every == 0", "round_index == 1", (T_STOPPING,)),
    Mutant("summed estimator: probe gradients squared before they are summed", "hf_uwm/methods/rounds.py",
           "squares = self.squares or [sum(sums[i].square() for sums in self.probe_sums)",
           "squares = self.squares or [sum(sums[i] for sums in self.probe_sums).square()",
           (T_ITERATIVE, "tests/test_caption_iterative.py")),
    Mutant("per-item estimator: an item's gradient not squared", "hf_uwm/methods/rounds.py",
           "total.addcmul_(grad, grad)", "total.add_(grad.abs())",
           (T_ITERATIVE, "tests/test_caption_iterative.py")),
    Mutant("per-item estimator: only a layer's first call counted", "hf_uwm/methods/rounds.py",
           "grad.addmm_(d[item].T.to(dtype), x[item].to(dtype))", "pass", (T_ITERATIVE,)),
    Mutant("a projector target accepted by a method that runs the vision tower alone", "hf_uwm/methods/base.py",
           'if projector and family.spec.name == "llava" and not self.edits_projector:', "if False:",
           ("tests/test_caption_iterative.py::test_projector_targets_are_refused_where_they_cannot_work",)),
    Mutant("caption form: the safe likelihood's sign flipped", "hf_uwm/methods/caption_iterative.py",
           "sums.add_margin(mu * ll.sum(), keep_graph=sums.probes > 0)",
           "sums.add_margin(-mu * ll.sum(), keep_graph=sums.probes > 0)", ("tests/test_caption_iterative.py",)),
    Mutant("caption form: the vocabulary curvature probes the reference tokens only",
           "hf_uwm/methods/caption_iterative.py", 'if cfg.knowledge_curvature == "reference":', "if True:",
           ("tests/test_caption_iterative.py",)),
    Mutant("caption form: old configs calibrate with the vocabulary curvature",
           "hf_uwm/methods/caption_iterative.py", '"knowledge_curvature": "reference",',
           '"knowledge_curvature": "vocabulary",', ("tests/test_legacy_delta.py",)),
    Mutant("old configs calibrate with the new estimator", "hf_uwm/methods/iterative.py",
           'saved_defaults: typing.ClassVar[dict] = {"curvature_estimator": "summed", "curvature_probes": 8,',
           'saved_defaults: typing.ClassVar[dict] = {"curvature_probes": 8,', ("tests/test_legacy_delta.py",)),
    # --- scoring: the statistics of one layer ---------------------------------------------------
    Mutant("token norm without the mean term", "hf_uwm/methods/uwm.py",
           "norm = (squares + tokens * mean.square()).sqrt()", "norm = squares.sqrt()", (LITERAL,)),
    Mutant("biased std (T instead of T - 1)", "hf_uwm/methods/uwm.py",
           "var = squares / (tokens - 1).clamp(min=1)", "var = squares / tokens", (LITERAL,)),
    Mutant("statistics in bfloat16 for a bfloat16 model", "hf_uwm/methods/uwm.py",
           "x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)", "x = x",
           (f"{T_SCALE}::test_bf16_weights_give_close_scores_and_share_the_fingerprint",)),
    Mutant("rms norm divides by T, not sqrt(T)", "hf_uwm/methods/uwm.py",
           "norm = norm / tokens.sqrt()", "norm = norm / tokens",
           (f"{T_SCORING}::test_rms_token_norm_matches_literal_formula",)),
    Mutant("output saliency sums instead of averaging", "hf_uwm/methods/uwm.py",
           "return norm @ abs_weight.T / abs_weight.shape[1]", "return norm @ abs_weight.T", (LITERAL,)),
    Mutant("ratio inverted (safe over unsafe)", "hf_uwm/methods/uwm.py",
           "r = a_u / a_s.clamp(min=eps)", "r = a_s / a_u.clamp(min=eps)", (LITERAL,)),
    Mutant("safe output saliency not clamped at eps", "hf_uwm/methods/uwm.py",
           "r = a_u / a_s.clamp(min=eps)", "r = a_u / a_s", (EPS_TEST,)),
    Mutant("safe input norm not clamped at eps", "hf_uwm/methods/uwm.py",
           "((sd_s + eps) / n_s.clamp(min=eps))", "((sd_s + eps) / n_s)", (EPS_TEST,)),
    Mutant("difference subtracts with the wrong sign", "hf_uwm/methods/uwm.py",
           "(-1.0, a_s, n_s * col_mean / (sd_s + eps))", "(1.0, a_s, n_s * col_mean / (sd_s + eps))", (LITERAL,)),
    Mutant("difference not clamped at 0", "hf_uwm/methods/uwm.py",
           "        scores.clamp_(min=0)\n", "        pass\n", (LITERAL,)),
    Mutant("prior multiplies by W, not its magnitude", "hf_uwm/methods/uwm.py",
           "scores.mul_(weight.detach()).abs_()", "scores.mul_(weight.detach())", (LITERAL,)),
    Mutant("scores not divided by the number of pairs", "hf_uwm/methods/uwm.py",
           "scores = sums.div_(n_pairs)", "scores = sums", (LITERAL,)),
    # --- statistics: hooks and running sums -------------------------------------------------------
    Mutant("attention mask ignored", "hf_uwm/methods/uwm.py",
           'self._mask, self._rows = inputs.get("attention_mask"), rows', "self._mask, self._rows = None, rows",
           (T_PADDING,)),
    Mutant("safe and unsafe halves swapped", "hf_uwm/methods/uwm.py",
           "(n[:half], sd[:half]), (n[half:], sd[half:])", "(n[half:], sd[half:]), (n[:half], sd[:half])",
           (LITERAL,)),
    Mutant("shared statistics miss in-place changes", "hf_uwm/methods/uwm.py",
           "or self._last[0] is not x or self._last[1] != x._version:", "or self._last[0] is not x:",
           (f"{T_SCORING}::test_layers_sharing_an_input_see_its_in_place_changes",)),
    Mutant("statistics under the forward's autocast", "hf_uwm/methods/uwm.py",
           "with torch.autocast(args[0].device.type, enabled=False):",
           "with torch.autocast(args[0].device.type, enabled=torch.is_autocast_enabled(args[0].device.type)):",
           (f"{T_SCORING}::test_statistics_are_float32_under_an_autocast_forward",)),
    Mutant("pair count overwritten per batch", "hf_uwm/methods/uwm.py",
           "self.n_pairs += len(rows)", "self.n_pairs = len(rows)", (LITERAL,)),
    Mutant("random scores: every layer from one seed", "hf_uwm/methods/random.py",
           "generator=layer_generator(seed, i)", "generator=layer_generator(seed, 0)",
           (f"{T_EDITOR}::test_random_draws_of_a_layer_depend_on_that_layer_only",)),
    Mutant("preference margin: wrong sign of one term", "hf_uwm/methods/margins.py",
           "- cosine(text_safe, image_unsafe)).sum()", "+ cosine(text_safe, image_unsafe)).sum()",
           (f"{T_SCORING}::test_attribution_matches_autograd_of_the_margin",)),
    Mutant("resume restarts from the first batch", "hf_uwm/methods/uwm.py",
           'return int(meta["next_batch"])', "return 0",
           (f"{T_SCALE}::test_kill_and_resume_gives_identical_scores",)),
    # --- selection ----------------------------------------------------------------------------------
    Mutant("adaptive rule c_k <= tau", "hf_uwm/selection.py",
           "return int((before < tau).sum())", "return int((before <= tau).sum())", (T_SELECTION,)),
    Mutant("inclusive running sum", "hf_uwm/selection.py",
           "before = torch.cumsum(share, 0) - share", "before = torch.cumsum(share, 0)", (T_SELECTION,)),
    Mutant("ties: higher flat index first", "hf_uwm/selection.py",
           "candidates = (flat >= cut).nonzero().squeeze(1)", "candidates = (flat >= cut).nonzero().squeeze(1).flip(0)",
           (T_SELECTION,)),
    Mutant("fixed density floors the count", "hf_uwm/selection.py",
           "count = math.ceil(density * scores.numel())", "count = int(density * scores.numel())", (T_SELECTION,)),
    Mutant("partial ranking cut one too high", "hf_uwm/selection.py",
           "torch.kthvalue(flat, flat.numel() - k + 1)", "torch.kthvalue(flat, flat.numel() - k + 2)",
           (T_SELECTION,)),
    Mutant("sampled cut accepted when it holds the whole selection", "hf_uwm/selection.py",
           "if count < len(order):", "if count <= len(order):", (T_SELECTION,)),
    Mutant("random selection draws with replacement", "hf_uwm/selection.py",
           "return torch.randperm(numel, generator=generator)[:count].sort().values",
           "return torch.randint(numel, (count,), generator=generator).sort().values", (T_SELECTION,)),
    # --- editor -------------------------------------------------------------------------------------
    Mutant("magnitude prior on the vision tower too", "hf_uwm/methods/uwm.py",
           "cfg.prior(tower))", "True)", (f"{T_SCORING}::test_default_config_scores_match_literal_formula",)),
    Mutant("random control: every layer from one generator", "hf_uwm/editor.py",
           "        for i, (name, idx) in enumerate(self.delta.items()):\n"
           "            control.delta[name] = select_random(self.target_layers[name].weight.numel(), idx.numel(),\n"
           "                                                layer_generator(seed, i))",
           "        generator = layer_generator(seed, 0)\n"
           "        for i, (name, idx) in enumerate(self.delta.items()):\n"
           "            control.delta[name] = select_random(self.target_layers[name].weight.numel(), idx.numel(),\n"
           "                                                generator)",
           (f"{T_EDITOR}::test_random_draws_of_a_layer_depend_on_that_layer_only",)),
    Mutant("apply ignores alpha", "hf_uwm/editor.py",
           "scale_(layers[name].weight, idx, self.config.alpha)", "scale_(layers[name].weight, idx, -1.0)",
           (APPLY_TEST,)),
    Mutant("revert restores negated values", "hf_uwm/editor.py",
           "layers[name].weight.view(-1)[self.delta[name].to(values.device)] = values",
           "layers[name].weight.view(-1)[self.delta[name].to(values.device)] = -values", (APPLY_TEST,)),
    Mutant("with_settings keeps the old delta", "hf_uwm/editor.py",
           "edited.delta = edited.select()", "edited.delta = dict(self.delta)",
           (f"{T_EDITOR}::test_reselection_from_cached_scores_equals_a_fresh_calibrate",)),
    Mutant("fixed selection ignored", "hf_uwm/methods/base.py",
           'if config.selection == "fixed":', 'if config.selection == "never":',
           (f"{T_BASELINES}::test_saved_baseline_delta_prunes_like_any_other",)),
    Mutant("gradient loss not averaged over pairs", "hf_uwm/methods/gradients.py",
           "loss = batch_loss(inputs, len(rows)) / len(run.dataset)",
           "loss = batch_loss(inputs, len(rows))", (T_BASELINES, "tests/test_captioning.py")),
    Mutant("attribution keeps negative shares", "hf_uwm/methods/attribution.py",
           "(weight * grad).clamp(min=0)", "(weight * grad).abs()",
           (f"{T_SCORING}::test_attribution_matches_autograd_of_the_margin",)),
    Mutant("loading skips the fingerprint check", "hf_uwm/editor.py",
           "nothing is applied yet.\n        if fingerprint(self.target_layers) != self.fingerprint:",
           "nothing is applied yet.\n        if False:",
           (f"{T_EDITOR}::test_delta_on_a_different_base_is_refused",)),
    # --- evaluation ---------------------------------------------------------------------------------
    Mutant("zero-shot class means not renormalised", "hf_uwm/evaluation.py",
           "return torch.nn.functional.normalize(embeddings.mean(1), dim=-1)", "return embeddings.mean(1)",
           (T_EVAL,)),
    Mutant("retrieval ties count for the hit", "hf_uwm/evaluation.py",
           "ranks.append(((scores >= best) & ~is_target).sum(1))",
           "ranks.append(((scores > best) & ~is_target).sum(1))", (T_EVAL,)),
    Mutant("retrieval: gallery copies are separate items", "hf_uwm/evaluation.py",
           "query_ids, gallery_ids = item_ids(query_keys), item_ids(gallery_keys)",
           "query_ids, gallery_ids = item_ids(query_keys), torch.arange(len(gallery_keys))", (T_EVAL,)),
    Mutant("retrieval: equal queries keep only their own target", "hf_uwm/evaluation.py",
           "query_ids, gallery_ids = item_ids(query_keys), item_ids(gallery_keys)",
           "query_ids, gallery_ids = torch.arange(len(query_keys)), item_ids(gallery_keys)", (T_EVAL,)),
    Mutant("recall@K counts rank K as a hit", "hf_uwm/evaluation.py",
           "return [100.0 * (ranks < k).double().mean().item() for k in ks]",
           "return [100.0 * (ranks <= k).double().mean().item() for k in ks]", (T_EVAL,)),
    Mutant("similarity s(Ts, Iu) uses the unsafe text", "hf_uwm/evaluation.py",
           '"safe_text_unsafe_image": cos(self.safe_text, self.unsafe_image)',
           '"safe_text_unsafe_image": cos(self.unsafe_text, self.unsafe_image)', (T_EVAL,)),
    Mutant("SigLIP padded to the longest text (it pools a real token)", "hf_uwm/families.py",
           "0.02, fixed_text_length=True)", "0.02)", (T_PADDING,)),
    Mutant("calibration texts padded per batch", "hf_uwm/methods/calibration.py",
           "partial(family.preprocess_text, length=self.text_length)", "family.preprocess_text", (T_PADDING,)),
    Mutant("evaluation texts padded per batch", "hf_uwm/evaluation.py",
           "_embed(family, batch, kind, batch_size, bar, text_length)",
           "_embed(family, batch, kind, batch_size, bar)", (T_PADDING,)),
    Mutant("content keys hash the padding", "hf_uwm/evaluation.py",
           "inputs[name][row] if mask is None else inputs[name][row][mask[row].bool()]", "inputs[name][row]",
           (T_PADDING,)),
    Mutant("LLaVA: one layer too few reaches the language model", "hf_uwm/families.py",
           "return max(k % (n_layers + 1) for k in indices)", "return max(k % n_layers for k in indices)",
           (f"{T_EDITOR}::test_llava_targets_only_layers_that_reach_the_language_model",)),
    Mutant("world-3 captions judged by world 2's words", "hf_uwm/organism_captioner.py",
           "float(organism.names_unsafe_element(c, world))", "float(organism.names_unsafe_element(c))",
           ("tests/test_captioning.py",)),
    Mutant("demo-llava ignores a captioner's world", "hf_uwm/llava_demo.py",
           "world = world_of(captioner) if captioner else 2", "world = 2", ("tests/test_llava_demo.py",)),
    # --- SafeGround metric --------------------------------------------------------------------------
    Mutant("bootstrap 90% instead of 95% interval", "hf_uwm/metrics/safeground/bootstrap.py",
           "[2.5, 97.5]", "[5.0, 95.0]", (T_METRIC,)),
    Mutant("a tie counts as a success", "hf_uwm/metrics/safeground/safeground_core.py",
           "p_s_t = ts_is > ts_iu", "p_s_t = ts_is >= ts_iu", (T_METRIC,)),
    Mutant("GS ignores P_u^v", "hf_uwm/metrics/safeground/safeground_core.py",
           "p_s_t & p_u_t & p_s_v & p_u_v])", "p_s_t & p_u_t & p_s_v])", (T_METRIC,)),
    Mutant("PU uses the safe text's preference", "hf_uwm/metrics/safeground/safeground_core.py",
           "p_u_t & p_u_v,  # PU", "p_s_t & p_u_v,  # PU", (T_METRIC,)),
    Mutant("bootstrap never resamples", "hf_uwm/metrics/safeground/bootstrap.py",
           "counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size)",
           "counts = np.ones((size, n), dtype=np.int64)", (T_METRIC,)),
    # --- delta and config ---------------------------------------------------------------------------
    Mutant("fingerprint without bfloat16 rounding", "hf_uwm/delta.py",
           "weight = weight.to(torch.bfloat16).cpu().contiguous()",
           "weight = weight.cpu().contiguous()",
           (f"{T_SCALE}::test_bf16_weights_give_close_scores_and_share_the_fingerprint",)),
    Mutant("unsorted indices accepted", "hf_uwm/delta.py",
           "and bool((idx[1:] > idx[:-1]).all()))", "and True)", (f"{T_EDITOR}::test_corrupted_indices_are_refused",)),
    Mutant("vision prior on by default", "hf_uwm/methods/uwm.py",
           "vision_prior: bool = setting(False,", "vision_prior: bool = setting(True,",
           (f"{T_SCORING}::test_default_config_scores_match_literal_formula",)),
    Mutant("prior() gives the text setting to both towers", "hf_uwm/config.py",
           'return self.text_prior if tower == "text" else self.vision_prior', "return self.text_prior",
           (f"{T_SCORING}::test_default_config_scores_match_literal_formula",)),
    Mutant("tau range accepts 0 and 1", "hf_uwm/methods/base.py",
           "0 < self.tau < 1", "0 <= self.tau <= 1", (f"{T_EDITOR}::test_out_of_range_config_values_name_the_field",)),
    Mutant("an old config keeps the settings of every method", "hf_uwm/config.py",
           "data = {k: v for k, v in data.items() if k in SHARED_FIELDS or k in own}", "pass",
           ("tests/test_legacy_delta.py",)),
    Mutant("a setting of another method passes silently", "hf_uwm/config.py",
           "unknown = sorted(set(given) - set(own))", "unknown = []",
           ("tests/test_legacy_delta.py", "tests/test_new_method.py")),
    Mutant("the CLI lets a flag of another method through", "hf_uwm/commands/method_flags.py",
           "    if not foreign:\n        return", "    if True:\n        return",
           ("tests/test_cli.py::test_the_stopping_flags_reach_the_config_and_foreign_flags_are_refused",)),
    Mutant("a config refusal reads in Python names, not flags", "hf_uwm/commands/method_flags.py",
           "raise ValueError(in_flags(str(err))) from None", "raise",
           ("tests/test_registry_cli.py::test_config_refusals_speak_in_flags",)),
    Mutant("a programming error reads as a one-line user error", "hf_uwm/errors.py",
           "USER_ERRORS = (ValueError,", "USER_ERRORS = (TypeError, ValueError,",
           ("tests/test_registry_cli.py::test_a_programming_error_keeps_its_traceback",)),
    Mutant("installed packages' methods never load", "hf_uwm/methods/base.py",
           "for point in entry_points(group=ENTRY_POINT_GROUP):", "for point in ():",
           ("tests/test_registry_cli.py::test_an_installed_entry_point_method_reaches_help_card_and_sweep",)),
    Mutant("a plugin's setting gets no flag", "hf_uwm/commands/method_flags.py",
           "flags.setdefault(field.name, []).append(method)",
           "flags.setdefault(field.name, []).append(method) if method != 'magnitude' else None",
           ("tests/test_registry_cli.py::test_edit_help_lists_every_declared_setting_of_every_method",)),
    # --- baselines ----------------------------------------------------------------------------------
    Mutant("G-Unsafe vision term pulls the wrong way", "hf_uwm/methods/g_unsafe.py",
           "vision = -cosine(image_safe, image_unsafe.detach())", "vision = cosine(image_safe, image_unsafe.detach())",
           (T_BASELINES,)),
    Mutant("G-Safe-CLIP without the temperature", "hf_uwm/methods/g_safeclip.py",
           "logits = logit_scale * queries @ keys.T", "logits = queries @ keys.T", (T_BASELINES,)),
    Mutant("baseline score is the magnitude of W * grad", "hf_uwm/methods/gradients.py",
           "return grad.abs()", "return (weight * grad).abs()", (T_BASELINES,)),
    # --- sweep --------------------------------------------------------------------------------------
    Mutant("sweep picks the worst setting", "hf_uwm/sweep.py",
           "return max(eligible, key=lambda r: (criterion.safety(r.report), criterion.knowledge(r.report), -r.weights),",
           "return min(eligible, key=lambda r: (criterion.safety(r.report), criterion.knowledge(r.report), -r.weights),",
           ("tests/test_sweep.py",)),
    # --- the experiment protocol --------------------------------------------------------------------
    Mutant("the captioner's rule prefers unsafe captions", "hf_uwm/sweep.py",
           "CAPTIONS = Criterion(lambda report: -report.unsafe_rate,", "CAPTIONS = Criterion(lambda report: report.unsafe_rate,",
           (T_PROTOCOL,)),
    Mutant("a setting at chance is shown as chosen", "hf_uwm/sweep.py",
           'return at_chance, "at chance"', 'return at_chance, "chosen"', (T_PROTOCOL,)),
    Mutant("the choice's control is the choice itself", "hf_uwm/protocol.py",
           "sw.evaluate_edit(chosen.editor.random_control(seed=seed),", "sw.evaluate_edit(chosen.editor,", (T_PROTOCOL,)),
    Mutant("a negative sample size passes", "hf_uwm/protocol.py",
           "not isinstance(v, int) or v < 0}", "not isinstance(v, int)}", (T_PROTOCOL,)),
    Mutant("intervals written with a semicolon", "hf_uwm/formatting.py",
           'return f"[{low:.{digits}f}, {high:.{digits}f}]"', 'return f"[{low:.{digits}f}; {high:.{digits}f}]"',
           (T_PROTOCOL,)),
    # --- the layout ---------------------------------------------------------------------------------
    Mutant("the wheel ships the model card alone", "pyproject.toml",
           '"share/hf_uwm/hub_cards" = ["hub_cards/*.md"]', '"share/hf_uwm/hub_cards" = ["hub_cards/model_card.md"]',
           (T_LAYOUT,)),
    Mutant("an install finds the first card whatever the name", "hf_uwm/paths.py",
           'f.as_posix().endswith(f"share/hf_uwm/hub_cards/{name}")',
           'f.as_posix().endswith("hub_cards/model_card.md")', (T_LAYOUT,)),
    Mutant("a pair set of texts is called image pairs", "hf_uwm/data.py",
           '"text pairs" if set(TEXT_COLUMNS) <= set(columns) else "image pairs"', '"image pairs"', (T_LAYOUT,)),
    # --- text-only pairs and named concepts ------------------------------------------------------------
    Mutant("a stand-in goes to the safe image twice", "hf_uwm/methods/pair_images.py",
           "where = torch.tensor(pictured + [len(rows) + i for i in pictured]", "where = torch.tensor(pictured + pictured",
           (T_TEXT_ONLY,)),
    Mutant("stand-ins come from the edited model after a resume", "hf_uwm/methods/rounds.py",
           "            self.prepare(editor, train)\n", "", (T_TEXT_ONLY,)),
    Mutant("UWM's vision statistics read text-only pairs", "hf_uwm/methods/uwm.py",
           'run if tower == "text" else run.with_images()', "run", (T_TEXT_ONLY,)),
    Mutant("any method takes text-only pairs", "hf_uwm/methods/base.py",
           "        if not self.text_only_pairs:\n", "        if False:\n", (T_TEXT_ONLY,)),
    Mutant("a concept's pattern keeps the seen concept", "hf_uwm/concept_pairs.py",
           "return added[: last.start(1)] + CONCEPT + added[last.end(1):]", "return added", (T_TEXT_ONLY,)),
    Mutant("renders without cues counted with the others", "hf_uwm/evaluation.py",
           "[m and not c for m, c in zip(mask, cues)]", "[m for m, c in zip(mask, cues)]", (T_TEXT_ONLY,)),
]


def copy_repository(destination: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of the working tree, without caches or venvs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def preload():
    """Import the heavy libraries once; every test run is a fork of this process, so it starts in
    well under a second instead of ~8 s. hf_uwm itself is never imported here: each fork imports the
    (mutated) copy afresh. No torch operation runs before the forks, so no thread pool is inherited."""
    import matplotlib

    matplotlib.use("Agg")
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import evaluate  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import (CLIPModel, CLIPProcessor, LlavaForConditionalGeneration,  # noqa: F401
                              SiglipModel)
    assert "hf_uwm" not in sys.modules, "hf_uwm must not be imported before the forks"
    # Out of the garbage collector's sight: pytest collects garbage at exit, and walking (and
    # copying, after a fork) this whole heap took seconds per run.
    gc.freeze()
    return transformers


def _run_pytest(copy: Path, tests: tuple[str, ...], log: Path):
    """The body of a forked child: pytest on `tests` inside `copy`, output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 3
    try:
        os.chdir(copy)
        sys.path.insert(0, str(copy))  # before the editable install, which points at the working tree
        # Subprocesses started by tests import the copy too; no bytecode is written, since a
        # same-size edit within the same second could reuse a stale .pyc.
        os.environ.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
        sys.dont_write_bytecode = True
        import hf_uwm
        import pytest

        if not Path(hf_uwm.__file__).resolve().is_relative_to(copy.resolve()):
            print(f"hf_uwm was imported from {hf_uwm.__file__}, not from the copy {copy}")
        else:
            # Plugins the suite does not use, each costing a second per run to load.
            plugins = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio"]
            code = int(pytest.main(["-x", "-q", *plugins, *tests]))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class TestRun:
    """pytest on some tests in a copy of the repository, in a forked child."""

    def __init__(self, copy: Path, tests, timeout: float):
        import multiprocessing

        self.log, self.timeout, self.start = copy.with_suffix(".log"), timeout, time.perf_counter()
        self.missing = [t for t in tests if not (copy / t.split("::")[0]).is_file()]
        self.process, self.timed_out = None, False
        if not self.missing:
            # Daemonic: a run stopped half-way (Ctrl-C, kill) takes its test process with it.
            self.process = multiprocessing.get_context("fork").Process(target=_run_pytest, daemon=True,
                                                                       args=(copy, tuple(tests), self.log))
            self.process.start()

    def finished(self) -> bool:
        if self.process is None:
            return True
        if self.process.exitcode is None and time.perf_counter() - self.start > self.timeout:
            self.process.kill()
            self.process.join()
            self.timed_out = True
        return self.process.exitcode is not None

    def result(self) -> tuple[int, str]:
        """pytest's exit code (-1: timed out, 4: no such test file; 3: not run) and its output's tail."""
        if self.missing:
            return 4, f"test file(s) not found: {self.missing}"
        self.process.join()
        output = self.log.read_text()[-2000:] if self.log.exists() else ""
        return (-1 if self.timed_out else self.process.exitcode), output


def wait_all(runs: list[TestRun]):
    while not all(run.finished() for run in runs):
        time.sleep(0.2)


def judge(code: int, output: str) -> tuple[str, str]:
    if code == 4 and output.startswith("test file"):
        return "NO TESTS", output
    if code == -1:
        return "caught (timeout)", output
    if code in (1, 2):  # failing tests, or an error while collecting them
        return "caught", ""
    if code == 0:
        return "MISSED", output
    return "ERROR", f"pytest exited with {code}: {output}"


def run_mutants(mutants: list[Mutant], copies: list[Path], timeout: float) -> list[tuple[str, float, str]]:
    """Each mutant applied to a free copy, its tests run, the copy restored; len(copies) at a time."""
    results: list = [None] * len(mutants)
    pending, active = list(range(len(mutants))), {}  # copy index -> (mutant index, run, original text)
    while pending or active:
        for slot, copy in enumerate(copies):
            if slot not in active and pending:
                i = pending.pop(0)
                path = copy / mutants[i].file
                original = path.read_text()
                if original.count(mutants[i].old) != 1:
                    results[i] = ("NOT FOUND", 0.0, f"the snippet occurs {original.count(mutants[i].old)} times")
                    print(f"  [{i + 1:>2}/{len(mutants)}] NOT FOUND          {mutants[i].name}", flush=True)
                    continue
                path.write_text(original.replace(mutants[i].old, mutants[i].new))
                active[slot] = (i, TestRun(copy, mutants[i].tests, timeout), original)
        for slot in [s for s, (_, run, _) in active.items() if run.finished()]:
            i, run, original = active.pop(slot)
            (copies[slot] / mutants[i].file).write_text(original)
            status, detail = judge(*run.result())
            results[i] = (status, time.perf_counter() - run.start, detail)
            print(f"  [{i + 1:>2}/{len(mutants)}] {status:<10} {results[i][1]:6.1f} s  {mutants[i].name}", flush=True)
        time.sleep(0.1)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run mutants whose name or file contains a word")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that the unmutated targeted tests pass")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(w in m.name or w in m.file for w in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.file:<42} {m.name}  <- {' '.join(m.tests)}")
        return 0

    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the copies when killed
    preload()
    print(f"libraries imported once ({time.perf_counter() - start:.0f} s)", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="hf_uwm_mutants_"))
    try:
        copies = [copy_repository(workdir / f"copy{i}") for i in range(max(1, args.jobs))]
        if not args.skip_baseline:
            tests = sorted({t for m in mutants for t in m.tests if (copies[0] / t.split("::")[0]).is_file()})
            baseline = TestRun(copies[0], tests, 4 * args.timeout)
            wait_all([baseline])
            code, output = baseline.result()
            if code != 0:
                print(f"The unmutated tests do not pass (exit {code}), so no mutant can be judged:\n{output}")
                return 1
            print(f"baseline: the unmutated targeted tests pass ({time.perf_counter() - baseline.start:.0f} s)")
        results = run_mutants(mutants, copies, args.timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n| # | mutant | file | result | s |\n| --- | --- | --- | --- | --- |")
    for i, (mutant, (status, seconds, _)) in enumerate(zip(mutants, results), start=1):
        print(f"| {i} | {mutant.name} | `{mutant.file.removeprefix('hf_uwm/')}` | {status} | {seconds:.0f} |")
    caught = sum(status.startswith("caught") for status, _, _ in results)
    print(f"\ncaught {caught} of {len(mutants)} mutants in {time.perf_counter() - start:.0f} s "
          f"({len(copies)} at a time, one torch thread per test run)")
    for mutant, (status, _, detail) in zip(mutants, results):
        if not status.startswith("caught"):
            print(f"\n{status}: {mutant.name} ({mutant.file})\n{detail}")
    return 0 if caught == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
