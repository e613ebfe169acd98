"""The bottom layer: what every other layer may use and which knows nothing of the method.

The project's error type (`errors`), devices, mixed precision and worker counts (`devices`), the
processes of a torchrun job (`distributed`), seeding and random state (`seeding`), progress
reporting (`progress`) and the schedules of learning rate and proportions (`schedules`)."""
