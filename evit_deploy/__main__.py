from evit_deploy.cli import main

main()
