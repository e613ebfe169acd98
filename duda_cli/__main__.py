from duda_cli.app import main

main()
