from editflow.engine.cli import entry

entry()
