r"""A reward server for DDPO's prompt-image alignment task.

The paper's VLM reward: LLaVA is asked "What is happening in this image?" and
its answer is scored by BERTScore recall against "The image contains
{prompt}". The models run in their own process, on their own device, behind
HTTP, so the JAX trainer needs neither torch nor their memory:

    python -m ddpo_jax.reward_server --model=llava-hf/llava-1.5-7b-hf --port=8765

and the trainer's reward `prompt_alignment` (ddpo_jax/rewards/prompt_alignment.py)
posts each sampling batch to it. `--model=tiny-random` serves tiny random models
built offline, for tests and the tiny preset.

  protocol.py  the JSON wire format (numpy and PIL only; the client uses it too)
  server.py    the HTTP server and its command line
  scorers.py   the LLaVA captioner and BERTScore (torch and transformers)

Importing this package imports neither torch nor transformers.
"""
