"""Optional experiment tracking (`logger=wandb`). history.csv and metrics.json never depend on it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from gcode_exp import trust


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class WandbLogger:
    """One wandb run per Hydra job, always finished (runs of a multirun must not merge)."""

    def __init__(self, cfg, run_dir: Path, group: str | None):
        import wandb

        self.wandb = wandb
        lc = cfg.logger
        self.run = wandb.init(
            project=lc.project, entity=lc.entity, group=lc.group or group, tags=list(lc.tags), mode=lc.mode,
            dir=str(run_dir), name=f"{run_dir.name}",
            config=flatten(trust.redact(OmegaConf.to_container(cfg, resolve=True))),  # no storage password
            reinit="finish_previous",
        )

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def finish(self, metrics: dict | None, plots_dir: Path | None) -> None:
        try:
            if metrics:
                self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
            if plots_dir is not None and plots_dir.is_dir():
                self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in sorted(plots_dir.glob("*.png"))})
        finally:
            self.run.finish(exit_code=0 if metrics else 1)


def make_logger(cfg, run_dir: Path) -> WandbLogger | None:
    if cfg.logger.name != "wandb":
        return None
    group = None
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        group = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
    except ValueError:  # not running under Hydra (tests, notebooks)
        pass
    return WandbLogger(cfg, run_dir, group)
