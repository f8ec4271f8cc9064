"""The transfer methods from the command line.

    python3 -m methods                                  # every method: its flags and what it reads
    python3 -m methods columns --table crd [--seeds "1 2"] TEACHER:STUDENT ...

`columns` prints, for each pair of networks (RepDistiller's names), one line `TEACHER STUDENT
MEMBERS`: the pair's cohort in a benchmark table (table1: the AT paper's Table 1, crd: the CRD
paper's) as a --cohort JSON list, the student alone and then every method's columns
(methods.columns) over the seeds, each member named <column>_seed<k>. scripts/table1.sh and
scripts/crd_table.sh read their rows from it.
"""
import argparse
import json

import methods

READS = {'pooled': 'the pooled feature', 'preact': 'the pre-ReLU groups', 'stem': "the stem's output",
         'feature_map': "the classifier's unpooled map",
         'input_gradient': "the student's input "
         'gradient', 'teacher_input_gradient': "the teacher's input gradient",
         'peers': "the logits of the cohort's other members",
         'strong_view': 'a strongly augmented view of each batch'}
STAGES = {'trains': '; trains in the init stage', 'parts': '; prepares its parts in the init stage'}


def describe():
    for m in methods.all_methods():
        reads = ', '.join(READS[r] for r in m.reads) or 'logits and groups'
        print(f'{m.title}: ' + ' '.join('--' + f.name for f in m.flags) +
              f' (reads {reads}{STAGES.get(m.init_stage, "")}{"; no teacher needed" if not m.teacher else ""})')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest='command')
    columns = commands.add_parser('columns', help="every pair's cohort in a benchmark table")
    columns.add_argument('pairs', nargs='+', metavar='TEACHER:STUDENT')
    columns.add_argument('--table', choices=methods.TABLES, default='crd')
    columns.add_argument('--seeds', default='1', help='seeds of every column, e.g. "1 2 3"')
    opt = p.parse_args(argv)
    if opt.command is None:
        return describe()
    seeds = [int(s) for s in opt.seeds.split()]
    for pair in opt.pairs:
        teacher, student = pair.split(':')
        print(teacher, student, json.dumps(methods.cohort(opt.table, teacher, student, seeds)))


if __name__ == '__main__':
    main()
