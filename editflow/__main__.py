from editflow.cli import entry

entry()
