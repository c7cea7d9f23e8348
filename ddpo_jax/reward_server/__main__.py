"""`python -m ddpo_jax.reward_server --help`: see `ddpo_jax.reward_server.server`."""

from ddpo_jax.reward_server import server

if __name__ == "__main__":
  server.main()
