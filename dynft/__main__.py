from dynft.cli import main

main(prog_name="dynft")
