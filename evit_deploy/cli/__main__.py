from evit_deploy.cli.app import main

main()
