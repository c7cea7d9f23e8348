r"""Prompt-image alignment (the paper's VLM task): reward = BERTScore recall of
LLaVA's answer to "What is happening in this image?" against "The image
contains {prompt}", computed by a reward server (ddpo_jax/reward_server).

No preset: SD v1.4 on "a(n) {animal} {activity}" prompts (45 common animals ×
washing the dishes, riding a bike, playing chess). Start the server first, on
its own GPU (LLaVA-1.5-7B in float16 takes ~15 GB), then the trainer:

    CUDA_VISIBLE_DEVICES=1 python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf \
        --bert_model=roberta-large --port=8765
    python -m ddpo_jax.main --config=configs/prompt_alignment.py --workdir=runs/prompt-alignment

(another host or port: --config.reward.kwargs.url=http://127.0.0.1:8765).

tiny: the toy-world model on toy-scene captions, one command; the reward
client launches a server of tiny random models itself and stops it at exit:

    python -m ddpo_jax.main --config=configs/prompt_alignment.py:tiny --workdir=runs/prompt-alignment-tiny

Its captioner is random, so its reward means nothing: the preset checks the
whole path (server, client, trainer), not that alignment improves.
"""

import ml_collections

from ddpo_jax import config_utils

base = config_utils.load_sibling(__file__, "base")


def get_config(preset: str | None = None):
  config = base.get_config()
  config.prompt.name = "nouns_activities"
  # Generalisation: the same animals doing an activity never trained on.
  config.eval.prompt.name = "unseen_activity"
  config.reward.name = "prompt_alignment"
  config.reward.kwargs = ml_collections.ConfigDict(
    {"url": "http://127.0.0.1:8765", "timeout_seconds": 120.0, "max_retries": 5, "batch_size": 16}
  )
  if preset:
    base.apply_preset(config, preset)
  if preset == "tiny":
    config.prompt.name = "toy_scenes"
    config.prompt.kwargs = ml_collections.ConfigDict()
    # One thread: the server shares the CPU cores with the trainer.
    config.reward.kwargs.update(
      {"launch_server": True, "server_args": "--model=tiny-random --torch_threads=1", "batch_size": 32}
    )
  return config
