from prmtool.cli import run

run()
