"""The labeling web app: people rank a policy's answers or judge policies blind (engine/label/commands.py lists
the actions; session.py, store.py, app.py, report.py, simulate.py, uncertain.py do them).

The highest package under the CLI: it samples from a policy (models, rollout) and simulates labelers with the
built-in task's people (task), and nothing below imports it."""
