"""LoRA adapters in peft's terms: which layers model.lora.targets names, what is trained beside them, and the
adapter folder (adapter_config.json + adapter_model.safetensors) that peft's PeftModel.from_pretrained reads and
writes, in both directions.

peft names an adapted layer by its module's name in the *ForSequenceClassification (a target matches a name equal
to it or ending in "." + it) and saves `base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight`
([out, r]), and each module it trains whole (modules_to_save; for SEQ_CLS the `classifier`) under its own names.
A head module that the base checkpoint lacks would be initialized at random again by whoever loads the base, so
flaxclf trains and saves it too (DistilBERT's pre_classifier, DeBERTa's pooler, a base model's ModernBERT head)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf import assets
from flaxclf.config import LoraConfig
from flaxclf.hf import weights
from flaxclf.hf.weights import HEAD, Path_, WeightsError
from flaxclf.models.classifier import ClassifierConfig, abstract_variables, make_classifier
from flaxclf.models.interface import Classifier
from flaxclf.nn import lora
from flaxclf.nn.lora import LoraSpec
from flaxclf.runtime import outputs

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = frozenset({CONFIG, WEIGHTS, "README.md"})
PREFIX = "base_model.model."
LABELS_KEY, PROBLEM_KEY = "flaxclf_label_names", "flaxclf_problem_type"  # adapter_model.safetensors' metadata


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / CONFIG).is_file()


def candidates(config: ClassifierConfig, abstract: dict) -> dict[str, Path_]:
    """Every layer an adapter can take: the encoder's dense layers, by their full state-dict module name (with the
    base model's prefix, as peft sees them) -> their module path in flaxclf's "params"."""
    family = config.backbone.family
    out = {}
    for path, leaf in flatten_dict(abstract["params"]).items():
        if path[-1] != "kernel" or len(leaf.shape) != 2 or path[0] in (HEAD[0], family.head_path):
            continue
        name = weights.flax_to_pt(family, path)[0].removesuffix(".weight")
        if name.startswith(family.prefix + "."):
            out[name] = path[:-1]
    return out


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of target_modules: the module's full name, or its end after a dot."""
    return name == target or name.endswith("." + target)


def resolve(cfg: LoraConfig, config: ClassifierConfig, abstract: dict, new_head: tuple[Path_, ...]) -> LoraSpec:
    """model.lora's settings as a LoraSpec for `config`'s model: the layers its targets name (the family's
    default without any), checked; the classifier and the head modules the base lacks (`new_head`) trained
    whole."""
    family = config.backbone.family
    targets = tuple(cfg.targets) if cfg.targets is not None else family.lora_targets
    layers = candidates(config, abstract)
    chosen: dict[str, Path_] = {}
    for t in targets:
        hit = {n: p for n, p in layers.items() if matches(n, t)}
        if not hit:
            short = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise WeightsError(f"model.lora.targets: {t!r} matches no layer of this {family.name} model; its layers "
                               f"are named {', '.join(short)} (or give a longer name, e.g. {next(iter(layers))})")
        chosen.update(hit)
    params = flatten_dict(abstract["params"])
    for name, path in chosen.items():
        n_in, n_out = params[(*path, "kernel")].shape
        if cfg.rank > min(n_in, n_out):
            raise WeightsError(f"model.lora.rank: {cfg.rank} is larger than layer {name} ({n_in} x {n_out}) allows; "
                               f"use at most {min(n_in, n_out)}")
    save = tuple(sorted({HEAD, *new_head}))
    return LoraSpec(cfg.rank, float(cfg.alpha), float(cfg.dropout), tuple(sorted(set(chosen.values()))), save)


def with_lora(model: Classifier, cfg: LoraConfig, new_head: tuple[Path_, ...] = ()) -> Classifier:
    """`model` with the adapter model.lora describes (the same module without one when rank is null)."""
    if cfg.rank is None:
        return model
    spec = resolve(cfg, model.config, abstract_variables(model), new_head)
    return _rebuilt(model, spec)


def with_new_head(model: Classifier, new_head: tuple[Path_, ...]) -> Classifier:
    """An adapted `model` that also trains (and saves) the head modules its base checkpoint lacks."""
    spec = model.config.lora
    return _rebuilt(model, dataclasses.replace(spec, save=tuple(sorted({*spec.save, *new_head}))))


def _rebuilt(model: Classifier, spec: LoraSpec) -> Classifier:
    return make_classifier(model.config.replace(lora=spec), dtype=model.dtype, remat=model.remat, impl=model.impl)


# ---------------------------------------------------------------------------------------------- writing
def _module_names(config: ClassifierConfig) -> dict[Path_, str]:
    """flaxclf module path -> the state dict's module name, for the adapted layers."""
    family = config.backbone.family
    return {m: weights.flax_to_pt(family, (*m, "kernel"))[0].removesuffix(".weight") for m in config.lora.modules}


def saved_modules(config: ClassifierConfig, params: dict) -> list[str]:
    """peft's modules_to_save for this adapter: the classifier, and each other module trained whole."""
    family, spec = config.backbone.family, config.lora
    names = set()
    for path in flatten_dict(params["params"]):
        if path[-1] not in (lora.A, lora.B) and spec.trains(path):
            names.add(weights.flax_to_pt(family, path)[0].rsplit(".", 1)[0])
    extra = sorted(n for n in names if n != "classifier" and not n.startswith("classifier."))
    return ["classifier", *extra]


def adapter_state(config: ClassifierConfig, params: dict) -> dict[str, np.ndarray]:
    """The adapter's tensors under peft's names (float32, PyTorch's [out, in] layout)."""
    family, spec = config.backbone.family, config.lora
    flat = flatten_dict(params["params"])
    out = {}
    for module, name in _module_names(config).items():
        for leaf in (lora.A, lora.B):
            out[f"{PREFIX}{name}.{leaf}.weight"] = np.ascontiguousarray(np.asarray(flat[(*module, leaf)], np.float32).T)
    for path, arr in flat.items():
        if path[-1] not in (lora.A, lora.B) and spec.trains(path):
            pt, transpose = weights.flax_to_pt(family, path)
            a = np.asarray(arr, np.float32)
            out[PREFIX + pt] = np.ascontiguousarray(a.T if transpose else a)
    return out


def adapter_config(config: ClassifierConfig, params: dict, base: str) -> dict[str, Any]:
    """adapter_config.json as peft writes it for LoraConfig(task_type="SEQ_CLS"); target_modules lists the adapted
    layers by their full names, so that peft adapts exactly these."""
    spec = config.lora
    return {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base, "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": sorted(_module_names(config).values()),
            "modules_to_save": saved_modules(config, params), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None}


def base_reference(name: str, model_dir: Path) -> str:
    """adapter_config.json's base_model_name_or_path for model.name: a hub id as given, a folder or a packaged
    name (which peft does not know) as the absolute folder it resolved to."""
    if name in assets.PACKAGED_MODELS or Path(name).expanduser().is_dir():
        return str(Path(model_dir).expanduser().absolute())
    return name


def export_adapter(folder: str | Path, config: ClassifierConfig, params: dict, base: str) -> Path:
    """Writes the adapter as peft's folder: PeftModel.from_pretrained(<the base, loaded as the family's
    *ForSequenceClassification with this num_labels>, folder) computes flaxclf's logits."""
    from safetensors.numpy import save

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(adapter_config(config, params, base), indent=2, sort_keys=True) + "\n")
        # The label names ride in the file's metadata, which peft ignores (an unknown key in adapter_config.json
        # would make peft warn): flaxclf reading the adapter back names its classes.
        meta = {"format": "pt", LABELS_KEY: json.dumps([config.id2label[i] for i in range(config.num_labels)]),
                PROBLEM_KEY: config.problem_type or ""}
        (tmp / WEIGHTS).write_bytes(save(adapter_state(config, params), metadata=meta))

    return outputs.write_folder(folder, write, ADAPTER_FILES)


# ---------------------------------------------------------------------------------------------- reading
def read_adapter(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, tensors by name) of a peft LoRA folder; what flaxclf can't compute is refused."""
    folder = Path(folder).expanduser()
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder / CONFIG} is not readable JSON ({e}); point at a folder written by peft's "
                           "save_pretrained") from None
    if cfg.get("peft_type") != "LORA":
        raise WeightsError(f"{folder} holds a {cfg.get('peft_type')} adapter; flaxclf reads LoRA adapters")
    unsupported = [k for k, off in (("use_dora", False), ("use_rslora", False), ("bias", "none"),
                                    ("fan_in_fan_out", False)) if cfg.get(k, off) != off]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
    if unsupported:
        raise WeightsError(f"{folder}'s adapter uses {', '.join(unsupported)}, which flaxclf does not compute; "
                           "train it with those left at peft's defaults")
    if (folder / WEIGHTS).is_file():
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / WEIGHTS))
    elif (folder / "adapter_model.bin").is_file():
        tensors = weights.read_torch_bin(folder / "adapter_model.bin")
    else:
        raise WeightsError(f"{folder} has no {WEIGHTS} or adapter_model.bin; point at a folder written by peft's "
                           "save_pretrained")
    return cfg, tensors


def adapter_values(folder: str | Path, config: ClassifierConfig, abstract: dict) -> tuple[LoraSpec, dict]:
    """The LoraSpec of a peft folder for a model of `config` (no adapter yet), and the adapter's values under
    flaxclf's paths. An adapter made for another model (a layer or weight it lacks, another shape) is refused,
    naming what differs."""
    cfg, tensors = read_adapter(folder)
    family = config.backbone.family
    layers = candidates(config, abstract)
    params = flatten_dict(abstract["params"])
    values: dict[Path_, np.ndarray] = {}
    modules, save, problems = set(), set(), []
    for key, arr in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", name)
        if m:
            module = layers.get(m.group(1))
            if module is None:
                problems.append(f"{m.group(1)} is not a layer of this model")
                continue
            n_in, n_out = params[(*module, "kernel")].shape
            want = (int(arr.shape[0]), n_in) if m.group(2) == lora.A else (n_out, int(arr.shape[1]))
            if tuple(arr.shape) != want:
                problems.append(f"{name} {tuple(arr.shape)} != {want}")
                continue
            modules.add(module)
            values[(*module, m.group(2))] = np.ascontiguousarray(np.asarray(arr, np.float32).T)
            continue
        mapped = weights.pt_to_flax(family, name.replace(".modules_to_save.default", ""))
        if mapped is None or mapped[0] not in params:
            problems.append(f"{name} is not a weight of this model")
            continue
        path, transpose = mapped
        a = np.asarray(arr, np.float32)
        a = np.ascontiguousarray(a.T) if transpose and a.ndim == 2 else a
        if tuple(a.shape) != tuple(params[path].shape):
            problems.append(f"{name} {tuple(a.shape)} != {tuple(params[path].shape)}")
            continue
        values[path] = a
        save.add(path[:-1])
    ranks = {int(v.shape[1]) for p, v in values.items() if p[-1] == lora.A}
    if not problems and (not modules or len(ranks) != 1 or any((*m, lora.B) not in values for m in modules)):
        problems.append("it holds no complete LoRA pair (lora_A and lora_B) of one rank")
    if problems:
        raise WeightsError(f"the adapter in {folder} does not fit the base model "
                           f"({family.name}, {config.num_labels} labels): {'; '.join(problems[:4])}")
    spec = LoraSpec(ranks.pop(), float(cfg.get("lora_alpha", 8)), float(cfg.get("lora_dropout", 0.0)),
                    tuple(sorted(modules)), tuple(sorted(save | {HEAD})))
    return spec, values


def _written_labels(folder: Path, num_labels: int) -> dict[str, Any]:
    """The label names and problem type a flaxclf export put in the adapter's metadata; none for peft's own."""
    if not (folder / WEIGHTS).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(folder.expanduser() / WEIGHTS), "np") as f:
        meta = f.metadata() or {}
    out: dict[str, Any] = {}
    names = json.loads(meta.get(LABELS_KEY, "[]"))
    if len(names) == num_labels:
        out["label_names"] = tuple(names)
    if meta.get(PROBLEM_KEY):
        out["problem_type"] = meta[PROBLEM_KEY]
    return out


def load(folder: str | Path, base: str | None = None, dtype: Any = None, impl: str = "fast",
         ) -> tuple[Classifier, dict, Path]:
    """(model, variables, base folder) of a peft LoRA folder on its base (adapter_config.json's
    base_model_name_or_path unless `base` is given): the base's weights, then the adapter's."""
    cfg, tensors = read_adapter(folder)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise WeightsError(f"{Path(folder) / CONFIG} names no base_model_name_or_path; pass the base model")
    base_dir = assets.resolve_model(base)
    config = weights.classifier_config(base_dir, impl)
    for key, arr in tensors.items():  # the classifier's output layer fixes the label count
        mapped = weights.pt_to_flax(config.backbone.family, key.removeprefix(PREFIX).replace(".modules_to_save.default",
                                                                                              ""))
        if mapped is not None and mapped[0] == (*HEAD, "kernel"):
            config = weights.classifier_config(base_dir, impl, num_labels=int(arr.shape[0]),
                                               **_written_labels(Path(folder), int(arr.shape[0])))
    plain = make_classifier(config, dtype=dtype or jnp.float32, impl=impl)
    spec, values = adapter_values(folder, config, abstract_variables(plain))
    model = make_classifier(config.replace(lora=spec), dtype=dtype or jnp.float32, impl=impl)
    # Quietly: the head the base lacks comes from the adapter, not fresh.
    variables, _ = weights.load_base(model, base_dir, jax.random.PRNGKey(0), report=False)
    flat = flatten_dict(variables["params"])
    flat.update(values)
    return model, {**variables, "params": unflatten_dict(flat)}, base_dir
