"""The launcher: a pure planner of commands and envs plus a thin spawner."""
