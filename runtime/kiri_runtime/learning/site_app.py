"""Kiri's Flower ClientApp: what a site's SuperNode runs for a round. Only the masked update leaves the site.

The SuperNode's node config names the site and its data (`site`, `data`, optionally `work-dir`):

    flower-supernode --superlink LINK:9092 --root-certificates ca.crt \
        --node-config 'site="site-a" data="/var/lib/kiri/site-data.npz"'

For a round, the site gets the global weights (checked against their sha256), trains the round's part on its
local `.npz` (`training.train_local`), and answers with the trained part. On the way out, Flower's mods,
innermost first: `fixedclipping_mod` clips the update (answer minus what the server sent) to the round's
`clipNorm`; `secaggplus_mod` quantises it and adds the pairwise and private masks of SecAgg+, so what reaches the
SuperLink is a vector of uniformly random-looking integers. The sample count and losses go as metrics (in the
clear); the weight Flower averages with is 1 for every site (strategies.UniformFedAvg).

`get_properties` answers the server's "which site are you" before the round.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Config, NDArrays, Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from kiri_runtime import weights as weights_files
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.loading import load_arrays, load_model
from kiri_runtime.learning.settings import (
    KEY_BASE,
    KEY_BASE_SHA,
    KEY_LORA_SEED,
    KEY_PART,
    KEY_POLICY,
    KEY_ROUND,
    ModelSettings,
    TrainingSettings,
)
from kiri_runtime.learning.training import train_local

log = logging.getLogger("kiri.learning.site")
DEFAULT_WORK_DIR = "/tmp/kiri-learning"


class SiteClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        node = context.node_config
        self.site = str(node.get("site", ""))
        if not self.site:
            raise LearningError(
                "node config 'site' is required (flower-supernode --node-config 'site=\"...\"')"
            )
        self.data = Path(str(node.get("data", "")))
        self.work_dir = Path(str(node.get("work-dir", DEFAULT_WORK_DIR)))
        self.keep_dir = Path(str(node.get("keep-dir", self.work_dir / "kept")))
        self.base_model = node.get("base-model")  # the base LM on this site, when not the run config's path
        self.run_config = context.run_config
        self.model = ModelSettings.from_run_config(context.run_config)
        self.training = TrainingSettings.from_run_config(context.run_config)

    def get_properties(self, config: Config) -> dict[str, Scalar]:
        return {"site": self.site}

    def _base(self, config: Config) -> Path:
        data, sha = config.get(KEY_BASE), str(config.get(KEY_BASE_SHA, ""))
        if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != sha:
            raise LearningError("the round's base weights do not match their sha256; refusing to train")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"global-{sha[:16]}{weights_files.suffix_for(data)}"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path

    def _keep(self, module: Any, number: int) -> Path:
        """perSite: the site's own model, written on the site (node config `keep-dir`), never sent."""
        from kiri_runtime.learning.loading import save_weights

        path = self.keep_dir / f"round-{number:04d}.safetensors"
        save_weights(module, path)
        return path

    def _fit_adapter(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from kiri_runtime.learning.adapter_rounds import (
            AdapterSettings,
            keep_on_site,
            last_kept,
            split_site_text,
            train_on_site,
        )

        a = AdapterSettings.from_run_config(dict(self.run_config))
        number = int(str(config[KEY_ROUND]))
        per_site = config.get(KEY_POLICY) == "perSite"
        data, held_out = self.data, None
        if per_site:  # the site's own held-out text: its adapter is measured where it is used
            data, held_out = split_site_text(self.data, self.work_dir / f"round-{number:04d}")
        base_model = str(self.base_model or a.base_model)
        out, metrics, trained = train_on_site(
            a,
            dict(config),
            list(parameters),
            data,
            self.work_dir,
            base_model,
            seed=number,
            learning_rate=self.training.learning_rate,
            batch_size=self.training.batch_size,
            kept=last_kept(self.keep_dir) if per_site else None,
        )
        log.info(
            "round %d: site %s trained its adapter (loss %.4f -> %.4f)",
            number,
            self.site,
            metrics["loss-before"],
            metrics["loss-after"],
        )
        if per_site:
            assert held_out is not None
            kept = keep_on_site(a, trained, self.keep_dir, number, held_out, base_model)
            return [], int(metrics["samples"]), {"site": self.site, **metrics, **kept}
        return out, 1, {"site": self.site, **metrics}

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        part = self.model.part
        if part.kind == "adapter":
            return self._fit_adapter(parameters, config)
        if json.loads(str(config.get(KEY_PART, "{}"))) != part.describe():
            raise LearningError(
                f"the round trains {config.get(KEY_PART)!r}, this site is set to {part.describe()}"
            )
        number = int(str(config[KEY_ROUND]))
        module = load_model(self.model.factory, self.model.factory_kwargs, self._base(config))
        x, y = load_arrays(self.data, "site data")
        result = train_local(
            module,
            x,
            y,
            part,
            epochs=self.training.epochs,
            lr=self.training.learning_rate,
            batch_size=self.training.batch_size,
            seed=number,
            lora_seed=int(str(config[KEY_LORA_SEED])),
        )
        metrics: dict[str, Scalar] = {
            "site": self.site,
            "samples": result.samples,
            "loss-before": result.loss_before,
            "loss-after": result.loss_after,
        }
        if config.get(KEY_POLICY) == "perSite":
            kept = self._keep(module, number)
            log.info("round %d: site %s keeps its model at %s; only metrics leave", number, self.site, kept)
            return [], result.samples, metrics
        names = sorted(result.update)
        if len(names) != len(parameters):
            raise LearningError(f"the round sent {len(parameters)} tensors, this model trains {len(names)}")
        out = [
            (np.asarray(p, dtype=np.float32) + result.update[n]).astype(np.float32)
            for n, p in zip(names, parameters, strict=True)
        ]
        log.info(
            "round %d: site %s trained on %d samples (loss %.4f -> %.4f)",
            number,
            self.site,
            result.samples,
            result.loss_before,
            result.loss_after,
        )
        return out, 1, metrics


def client_fn(context: Context) -> Any:
    return SiteClient(context).to_client()


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for rounds that run it; a round without it is refused unless the site allows plain rounds.

    The site decides, not the server: a server that skipped SecAgg+ would otherwise get the update in the
    clear. `--node-config 'allow-plain-rounds=true'` is for sites that accept that (the benchmark's baseline).
    """
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    fit = msg.content.config_records.get("fitins.config")
    if fit is not None and fit.get(KEY_POLICY) == "perSite":
        out = call_next(msg, ctxt)
        if not out.has_error():
            for record in out.content.array_records.values():
                if len(record) > 0:  # the site app sent nothing; whatever changes that, it does not leave
                    record.clear()
        return out
    if ctxt.node_config.get("allow-plain-rounds") is not True:
        raise LearningError(
            "this round does not use secure aggregation and the site requires it "
            "(node config allow-plain-rounds=true to accept plain rounds)"
        )
    return call_next(msg, ctxt)


def clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` on every update that leaves; a perSite round sends none to clip."""
    fit = msg.content.config_records.get("fitins.config") if msg.has_content() else None
    if fit is not None and fit.get(KEY_POLICY) == "perSite":
        return call_next(msg, ctxt)
    return fixedclipping_mod(msg, ctxt, call_next)


# Mods run outermost first: SecAgg+ masks what fixedclipping_mod clipped.
client_app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod, clipping_mod])
