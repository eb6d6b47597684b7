"""Train the tiny Llama on the demo corpus from a script, with a custom callback."""

import sys

from eurotrain import Trainer, build_model, load_config


class PrintEvery:
    """A callback: side concerns hook in here, not inside the loop."""

    def on_step_end(self, trainer, step, metrics):
        if step % 10 == 0 and trainer.dist.is_main:
            print(f"[callback] step {step}: loss {metrics['loss']:.3f}")


cfg = load_config("configs/tiny.yaml", ["--train.steps", "20", *sys.argv[1:]])
print(f"model: {cfg.model.num_params() / 1e6:.2f}M parameters")
print(build_model(cfg.model).layers["0"])  # built on the meta device: no memory used
result = Trainer(cfg, callbacks=[PrintEvery()]).train()
print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, run dir {result.run_dir}")
