"""lm-evaluation-harness on both paths, on the bundled tasks read from local files (no hub).

    tspeft-rt lm-eval --model tspeft --model_args adapter=runs/demo/adapter --device cpu --batch_size 16 \
        --tasks tspeft_arc_easy,tspeft_piqa --limit 100                     # Hugging Face path, gates applied
    tspeft-rt lm-eval --model local-completions --tasks tspeft_arc_easy --limit 100 --model_args \
        model=gated,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=<model folder>,tokenizer_backend=huggingface
                                                                            # as served by `tspeft-rt serve`

`tspeft-rt lm-eval` is lm-eval's own command line with two additions: the model class `tspeft`
(lm-eval's `hf` model with a tspeft-rt adapter attached by the one loader, gates applied) and the
tasks `tspeft_<task>` for the eight bundled tasks (`tspeft_commonsense`: all of them), written as lm-eval
task configs over JSON files of the bundled validation splits. In Python, import this module (it
registers `tspeft`) and pass `task_manager()` to `lm_eval.simple_evaluate`.

The tasks pose each example exactly as `tspeft-rt eval` does (`tspeft_rt.data.load_task`: the same
contexts, continuations with their leading space, winogrande's partial scoring, the same order, so
`--limit N` takes the same examples), with an empty target delimiter. Two conventions are lm-eval's:
it tokenizes context + continuation as one string and splits at the context's tokens (tspeft-rt
encodes the two apart), and `acc_norm` divides by the continuation's characters (tspeft-rt: its UTF-8
bytes; equal for ASCII text). Winogrande reports `acc` only, as lm-eval's own winogrande does. And
`local-completions` sends no BOS unless given `add_bos_token=True` (its `hf` model and tspeft-rt use the
tokenizer's default): with a tokenizer that adds BOS, pass it to score what the server's users get.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from tspeft_rt.assets import BUNDLED_MODEL, cache_dir
from tspeft_rt.data import TASK_DIRS, MCExample, load_task

GROUP = "tspeft_commonsense"
METRICS = {"acc": "mean", "acc_norm": "mean"}


@register_model("tspeft")
class TSPeftLM(HFLM):
    """lm-eval's Hugging Face model with a tspeft-rt (or PEFT) adapter attached, its gates applied as in
    `tspeft-rt eval` and `generate`. model_args: pretrained (a model folder or the bundled model's name),
    adapter (a directory; omitted: the base model), and any of lm-eval's `hf` arguments."""

    def __init__(self, pretrained: str = BUNDLED_MODEL, adapter: str | None = None, **kwargs) -> None:
        from tspeft_rt.generate import load_model_with_adapter

        model, tokenizer, _ = load_model_with_adapter(pretrained, adapter)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)


def _doc(ex: MCExample) -> dict:
    """One example as the task config reads it. Winogrande's choices differ in their contexts (lm-eval's
    multiple-input form: `gold` picks the context), the others' in their continuations."""
    contexts = {c.context for c in ex.choices}
    if len(contexts) == 1:
        return {"context": ex.choices[0].context, "choices": [c.continuation for c in ex.choices], "gold": ex.gold}
    return {"contexts": [c.context for c in ex.choices], "continuation": ex.choices[0].continuation, "gold": ex.gold}


def _config(task: str, data: Path, multiple_input: bool) -> dict:
    fields = {"doc_to_text": "{{gold}}", "doc_to_choice": "{{contexts}}", "doc_to_target": "{{continuation}}"} \
        if multiple_input else {"doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"}
    metrics = ["acc"] if multiple_input else list(METRICS)
    return {"task": f"tspeft_{task}", "tag": [GROUP], "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data)}}, "validation_split": "validation",
            "output_type": "multiple_choice", "target_delimiter": "", **fields,
            "metric_list": [{"metric": m, "aggregation": METRICS[m], "higher_is_better": True} for m in metrics],
            "metadata": {"version": 1.0}}


def write_tasks(folder: Path) -> Path:
    """The eight bundled tasks' validation splits and lm-eval task configs (YAML is a superset of the JSON
    written) in `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASK_DIRS:
        docs = [_doc(ex) for ex in load_task(task, "validation")]
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"tspeft_{task}.yaml").write_text(json.dumps(_config(task, data.resolve(), "contexts" in docs[0]),
                                                               indent=1))
    return folder


def tasks_folder() -> Path:
    """Where the task configs are written: the tspeft-rt cache ($TSPEFT_RT_CACHE)/lm_eval_tasks."""
    return write_tasks(cache_dir() / "lm_eval_tasks")


def task_manager():
    """lm-eval's TaskManager with the bundled tasks included."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_folder()))


def cli(args: list[str]) -> None:
    """lm-eval's command line with `tspeft` registered and the bundled tasks on the include path."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args, "--include_path", str(tasks_folder())]
    cli_evaluate()
