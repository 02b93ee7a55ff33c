"""Zero-shot accuracy through lm-evaluation-harness, on the model object already in memory.

Offline use: ``tasks_data_dir`` is a folder of local files in the Hugging Face schemas (``../shared/data/eval``).
For every requested task with a local file we write a tiny task YAML that ``include:``s the stock lm-eval YAML by
absolute path and only swaps the data source (``dataset_path: json`` + ``data_files``), so prompts, choices, filters
and metrics stay exactly lm-eval's. The same folder works with lm-eval's own CLI (``--include_path``).

Metric choice: acc_norm where the task reports it (ARC, HellaSwag, PIQA: length-normalised log-likelihood, the
number papers quote), else acc (LAMBADA, WinoGrande). Values are percent with 2 decimals; ``acc_avg`` is their mean.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .errors import ConfigError, DataError, one_line, shown
from .progress import Reporter
from .validate import safe_message

DEFAULT_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "hellaswag", "lambada_openai", "piqa", "winogrande")
LOCAL_SUFFIX = "_local"  # generated task name = stock name + suffix (a task name must be unique in lm-eval's index)

# Where the stock YAMLs of the common tasks live inside lm_eval/tasks; saves building lm-eval's whole index
# (about 7 s, 14k entries). Any other task is looked up in that index.
_KNOWN_STOCK_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
}
# Local file names tried for a task, in order ({t} = task name); the builder is the datasets loader for the suffix.
_FILE_PATTERNS = ("{t}.jsonl", "{t}.json", "{t}_sample.jsonl", "{t}_sample.json", "{t}.parquet", "{t}.csv")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class AccuracyOptions:
    tasks: Sequence[str] = DEFAULT_TASKS
    tasks_data_dir: Optional[str] = None  # folder of HF-schema files; None = stock lm-eval datasets (hub/cache)
    limit: Optional[int] = None  # first N documents per task (quick runs)
    batch_size: int = 8
    num_fewshot: Optional[int] = None  # None = the task's default (0 for all default tasks)
    task_config_dir: Optional[str] = None  # keep the generated YAMLs here (else a temp folder, removed after)


@dataclass
class LocalTask:
    """One generated offline task config."""

    task: str  # stock lm-eval name, e.g. "arc_easy"
    local_name: str  # name of the generated task, e.g. "arc_easy_local"
    stock_yaml: str
    data_file: str
    split: str  # "test" or "validation": the split lm-eval evaluates the stock task on
    yaml_path: str = ""


@dataclass
class TaskPlan:
    """What simple_evaluate will run: generated local tasks plus stock tasks (those without a local file)."""

    local: list[LocalTask] = field(default_factory=list)
    stock: list[str] = field(default_factory=list)
    config_dir: Optional[str] = None

    def lm_eval_names(self) -> list[str]:
        return [t.local_name for t in self.local] + list(self.stock)

    def display_name(self, lm_eval_name: str) -> str:
        for t in self.local:
            if t.local_name == lm_eval_name:
                return t.task
        return lm_eval_name


# --- locating stock task configs ----------------------------------------------------------------------------------

_INDEX = None


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _full_index():
    global _INDEX
    if _INDEX is None:
        from lm_eval.tasks import TaskManager

        _INDEX = TaskManager().task_index
    return _INDEX


def _load_stock_cfg(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, recursive=True)


def stock_task_yaml(task: str) -> tuple[Path, dict]:
    """Absolute path of the installed stock YAML of ``task`` and its merged config; ConfigError if unknown."""
    rel = _KNOWN_STOCK_YAML.get(task)
    if rel is not None:
        path = lm_eval_tasks_dir() / rel
        if path.exists():
            cfg = _load_stock_cfg(path)
            if cfg.get("task") == task:
                return path, cfg
    entry = _full_index().get(task)
    if entry is None:
        raise ConfigError(f"{shown(task)} is not an lm-eval task name; see `lm_eval ls tasks` for the list.")
    if entry.yaml_path is None or entry.cfg is None or "task" not in (entry.cfg or {}):
        raise ConfigError(f"{shown(task)} is an lm-eval group or tag, not a single task; name its tasks one by one.")
    path = Path(entry.yaml_path)
    return path, _load_stock_cfg(path)


def evaluated_split(cfg: dict) -> str:
    """lm-eval scores a task on its test split when it has one, else on validation."""
    if cfg.get("test_split"):
        return "test"
    if cfg.get("validation_split"):
        return "validation"
    raise ConfigError(f"Task {cfg.get('task')!r} has neither a test nor a validation split; it cannot run offline.")


def find_local_file(task: str, data_dir: str | os.PathLike) -> Optional[Path]:
    base = Path(data_dir)
    for pattern in _FILE_PATTERNS:
        path = base / pattern.format(t=task)
        if path.is_file():
            return path
    return None


def plan_tasks(tasks: Sequence[str], tasks_data_dir: Optional[str] = None) -> TaskPlan:
    """Decide for every task whether it runs from a local file (generated config) or from lm-eval's stock config."""
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ConfigError("No lm-eval task given; pass --tasks, e.g. --tasks arc_easy,piqa.")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"Task list {tasks} names a task twice.")
    plan = TaskPlan()
    if tasks_data_dir is not None and not Path(tasks_data_dir).is_dir():
        raise DataError(f"--tasks_data_dir {tasks_data_dir!r} is not a folder; point it at e.g. ../shared/data/eval.")
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    for task in tasks:
        stock_yaml, cfg = stock_task_yaml(task)
        data_file = find_local_file(task, tasks_data_dir) if tasks_data_dir else None
        if data_file is None:
            if tasks_data_dir and offline:
                yaml_note = (" (task YAMLs are not read from it: it holds the data files themselves)"
                             if any(Path(tasks_data_dir).glob(f"{task}.y*ml")) else "")
                raise DataError(
                    f"No local file for task {task!r} in {tasks_data_dir} (tried "
                    f"{', '.join(p.format(t=task) for p in _FILE_PATTERNS)}){yaml_note}; add one in the HF schema "
                    "or drop the task."
                )
            plan.stock.append(task)
            continue
        plan.local.append(LocalTask(task, task + LOCAL_SUFFIX, str(stock_yaml), str(data_file.resolve()),
                                    evaluated_split(cfg)))
    return plan


def write_task_configs(plan: TaskPlan, out_dir: str | os.PathLike) -> TaskPlan:
    """Write one YAML per local task into ``out_dir`` (usable as lm-eval's ``--include_path``)."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in plan.local:
        builder = _BUILDERS[Path(t.data_file).suffix]
        other = "validation" if t.split == "test" else "test"
        cfg = {
            "include": t.stock_yaml,
            "task": t.local_name,
            # The stock tags (e.g. ai2_arc) would pull the local copy into stock groups; keep it out of them.
            "tag": [],
            "dataset_path": builder,
            "dataset_name": None,
            "training_split": None,  # without this lm-eval asks the file for a 'train' split (KeyError)
            "fewshot_split": None,
            f"{t.split}_split": t.split,
            f"{other}_split": None,
            "dataset_kwargs": {"data_files": {t.split: t.data_file}},
        }
        path = out / f"{t.local_name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t.yaml_path = str(path)
    plan.config_dir = str(out)
    return plan


# --- checking local task files before a model loads --------------------------------------------------------------

CHECKED_DOCS = 20  # documents per local task that lm-eval renders before a model loads
_DATA_PACKAGES = ("datasets", "pyarrow", "jinja2")  # an lm-eval failure in these read or templated a task's data


def check_tasks(tasks: Sequence[str], tasks_data_dir: Optional[str] = None, limit: Optional[int] = None) -> None:
    """Before a model loads: every task is an lm-eval task, and every local task file reads as that task's
    documents (each JSON line parses, all have the same fields, and lm-eval builds the task and renders its first
    documents with the task's own templates). One DataError naming the file otherwise."""
    plan = plan_tasks(tasks, tasks_data_dir)
    for t in plan.local:
        _check_json_documents(Path(t.data_file))
    if plan.local:
        _render_local_tasks(plan, min(limit or CHECKED_DOCS, CHECKED_DOCS))


def _task_file_error(path: Path, problem: str) -> DataError:
    return DataError(f"Task file {path.name!r} in --tasks_data_dir: {problem}; fix the file or drop its task from "
                     "--tasks.")


def _json_documents(path: Path) -> list[tuple[str, object]]:
    """(where, document) of a JSON Lines file, or of a .json file holding one array (as datasets reads them)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON Lines in a .json file
        if isinstance(whole, list):
            return [(f"item {i}", doc) for i, doc in enumerate(whole, 1)]
        if whole is not None:
            raise _task_file_error(path, f"it holds a JSON {type(whole).__name__}, not a list of documents")
    docs = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if line.strip():
            try:
                docs.append((f"line {number}", json.loads(line)))
            except ValueError:
                raise _task_file_error(path, f"line {number} is not valid JSON") from None
    return docs


def _check_json_documents(path: Path) -> None:
    if path.suffix not in (".json", ".jsonl"):
        return  # parquet/csv: datasets reads them when the task is rendered
    try:
        docs = _json_documents(path)
    except UnicodeDecodeError:
        raise _task_file_error(path, "it is not UTF-8 text") from None
    except OSError as exc:
        raise _task_file_error(path, f"it cannot be read ({exc.strerror})") from None
    if not docs:
        raise _task_file_error(path, "it holds no documents")
    first_where, first = docs[0]
    for where, doc in docs:
        if not isinstance(doc, dict):
            raise _task_file_error(path, f"{where} is a JSON {type(doc).__name__}, not an object with the task's "
                                         "fields")
        if set(doc) != set(first):
            missing, extra = sorted(set(first) - set(doc)), sorted(set(doc) - set(first))
            raise _task_file_error(path, f"{where} has other fields than {first_where} (missing {shown(missing)}, "
                                         f"extra {shown(extra)}); every document needs the same fields")


def _render_local_tasks(plan: TaskPlan, docs: int) -> None:
    """lm-eval builds each local task from its file (datasets reads the whole file) and builds the requests of its
    first ``docs`` documents, as the evaluation will: a file in another task's schema fails here."""
    tmp = tempfile.mkdtemp(prefix="flatquant_lm_eval_check_")
    try:
        write_task_configs(plan, tmp)
        with _quiet():
            from lm_eval.tasks import TaskManager, get_task_dict

            manager = TaskManager(include_path=tmp, include_defaults=False)
            for t in plan.local:
                try:
                    get_task_dict([t.local_name], manager)[t.local_name].build_all_requests(limit=docs)
                except Exception as exc:  # datasets' and pyarrow's read errors, jinja2's template errors, ...
                    raise _task_file_error(Path(t.data_file), f"lm-eval cannot read it as {t.task} "
                                                              f"({_root_cause(exc)})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """Progress bars, warnings and log lines of datasets and lm-eval held back: a failed check prints one line."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _root_cause(exc: BaseException) -> str:
    """'Type: message' of the innermost exception of a chain, one bounded line without server paths."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return one_line(safe_message(f"{type(exc).__name__}: {exc}"), 200)


def _from_task_data(exc: BaseException) -> bool:
    """Whether an lm-eval failure came from reading or templating a task's documents (datasets, pyarrow, jinja2
    frames in its traceback), not from the model."""
    while exc is not None:
        tb = exc.__traceback__
        while tb is not None:
            if any(p in Path(tb.tb_frame.f_code.co_filename).parts for p in _DATA_PACKAGES):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


# --- running and summarising ------------------------------------------------------------------------------------------


def headline_metric(task_results: dict) -> tuple[str, float, Optional[float]]:
    """(metric name, value in [0,1], stderr) using acc_norm where present, else acc."""
    for metric in ("acc_norm", "acc"):
        key = f"{metric},none"
        if key in task_results and task_results[key] is not None:
            stderr = task_results.get(f"{metric}_stderr,none")
            return metric, float(task_results[key]), (float(stderr) if isinstance(stderr, (int, float)) else None)
    raise DataError(f"lm-eval returned neither acc nor acc_norm for task {task_results.get('alias')!r}.")


def summarize(results: dict, plan: TaskPlan, order: Sequence[str]) -> dict:
    """Turn simple_evaluate's output into the report section: percent values, metric names, sample counts."""
    per_task: dict[str, dict] = {}
    n_samples = results.get("n-samples", {})
    for name, res in results.get("results", {}).items():
        shown = plan.display_name(name)
        if shown not in order:  # group rows, if a user named a task whose result has sub-entries
            continue
        metric, value, stderr = headline_metric(res)
        raw = {k.split(",")[0]: (float(v) if isinstance(v, (int, float)) else v)
               for k, v in res.items() if "," in k and isinstance(v, (int, float))}
        per_task[shown] = {
            "metric": metric,
            "value_pct": round(100.0 * value, 2),
            "stderr_pct": None if stderr is None else round(100.0 * stderr, 2),
            "samples": int(n_samples.get(name, {}).get("effective", 0)) or None,
            "lm_eval_task": name,
            "raw": raw,
        }
    acc = {t: per_task[t]["value_pct"] for t in order if t in per_task}
    if acc:
        acc["acc_avg"] = round(sum(100.0 * per_task[t]["raw"][per_task[t]["metric"]] for t in order if t in per_task)
                               / len(per_task), 2)
    return {"acc": acc, "tasks": per_task, "metric": {t: per_task[t]["metric"] for t in order if t in per_task}}


def format_acc_line(acc: dict) -> str:
    """The sample's line: ACC: {'arc_challenge': 42.83, ..., 'acc_avg': 67.45}."""
    return f"ACC: {dict(acc)!r}"


def _report_requests(lm, model: nn.Module, reporter: Reporter, label: str):
    """Progress inside lm-eval: the number of requests comes from the log-likelihood call, each forward of the
    model advances by its batch rows (an estimate: lm-eval may answer several requests with one row); an 'eval'
    event (step of steps) goes out per whole percent and at the end, and the cancel token is checked before every
    forward. Returns the hook handle (remove it when done)."""
    state = {"done": 0, "total": 0, "pct": -1}
    loglikelihood = lm.loglikelihood

    def counted(requests, *args, **kwargs):
        state.update(total=len(requests), done=0, pct=-1)
        out = loglikelihood(requests, *args, **kwargs)
        # requests sharing a context share a forward row, so the rows counted may stop short of the total
        reporter.emit("acc_requests", {"model": label, "done": state["total"], "total": state["total"]},
                      step=state["total"], steps=state["total"])
        return out

    def hook(_module, args, kwargs):
        reporter.check()
        ids = args[0] if args else kwargs.get("input_ids")
        if state["total"] and ids is not None:
            state["done"] = min(state["total"], state["done"] + int(ids.shape[0]))
            pct = 100 * state["done"] // state["total"]
            if pct != state["pct"]:
                state["pct"] = pct
                reporter.emit("acc_requests", {"model": label, "done": state["done"], "total": state["total"]},
                              step=state["done"], steps=state["total"])

    lm.loglikelihood = counted
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def evaluate_accuracy(model: nn.Module, tokenizer, options: AccuracyOptions | None = None,
                      reporter: Reporter | None = None, label: str = "model") -> dict:
    """Run lm-eval's simple_evaluate on ``model`` (wrapped by HFLM, no reload) and return the report section."""
    options = options or AccuracyOptions()
    reporter = reporter or Reporter()
    order = [t.strip() for t in options.tasks if t and t.strip()]
    plan = plan_tasks(order, options.tasks_data_dir)
    tmp = None
    if plan.local:
        if options.task_config_dir:
            write_task_configs(plan, options.task_config_dir)
        else:
            tmp = tempfile.mkdtemp(prefix="flatquant_lm_eval_")
            write_task_configs(plan, tmp)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        reporter.check()
        if options.limit:
            reporter.emit("acc_start_limit", {"model": label, "tasks": order, "limit": options.limit})
        else:
            reporter.emit("acc_start", {"model": label, "tasks": order})
        # Stock tasks need lm-eval's own index; local-only runs skip it (it takes seconds to build).
        manager = TaskManager(include_path=plan.config_dir, include_defaults=bool(plan.stock))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
        handle = _report_requests(lm, model, reporter, label)
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=plan.lm_eval_names(), num_fewshot=options.num_fewshot, limit=options.limit,
                task_manager=manager, log_samples=False, bootstrap_iters=1000,
            )
        except (FileNotFoundError, ConnectionError) as exc:
            raise DataError(f"lm-eval could not read a task's data: {str(exc).splitlines()[0]}. Pass "
                            "--tasks_data_dir with local files (e.g. ../shared/data/eval).") from exc
        except Exception as exc:
            if not _from_task_data(exc):
                raise
            raise DataError(f"lm-eval could not use the documents of {', '.join(order)} ({_root_cause(exc)}); fix "
                            "the task file (its first documents were checked before the run) or drop the task."
                            ) from exc
        finally:
            handle.remove()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    section = summarize(results, plan, order)
    missing = [t for t in order if t not in section["tasks"]]
    if missing:
        raise DataError(f"lm-eval returned no result for {missing}.")
    section.update({
        "unit": "percent",
        "limit": options.limit,
        "num_fewshot": {plan.display_name(k): v for k, v in results.get("n-shot", {}).items()
                        if plan.display_name(k) in section["tasks"]},
        "tasks_data_dir": options.tasks_data_dir,
        "task_config_dir": options.task_config_dir,
        "lm_eval_version": results.get("lm_eval_version"),
    })
    reporter.emit("acc_value", {"model": label, "acc": dict(section["acc"])})
    return section
