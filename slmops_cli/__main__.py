from slmops_cli.main import main

main()
