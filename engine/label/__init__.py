"""The labeling web app: people rank a policy's answers or judge policies blind (engine/label/commands.py lists
the actions; session.py, store.py, app.py, report.py, simulate.py, uncertain.py do them)."""
