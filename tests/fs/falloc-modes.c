/* falloc-modes DIR: every fallocate(2) mode, and some refusals, each on a fresh 64 KiB
 * file in DIR; one line per case: "<case>: <ok|ERRNO name> size=<bytes> fnv=<hash of the
 * content>". Built static (cc -static) by tests/fs/fallocate.sh, which runs the same
 * binary in the guest (directly on its filesystem) and on the host through fs/, and
 * compares the lines. The first line describes the untouched file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/falloc.h>

#define SIZE 65536

struct fcase {
	const char *name;
	int mode;
	off_t off, len;
};

static const struct fcase cases[] = {
	{"plain-extend", 0, 61440, 16384},
	{"keep_size", FALLOC_FL_KEEP_SIZE, 61440, 16384},
	{"punch_hole", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192},
	{"punch_hole-unaligned", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 5000},
	{"punch_hole-without-keep_size", FALLOC_FL_PUNCH_HOLE, 4096, 8192},
	{"zero_range", FALLOC_FL_ZERO_RANGE, 8192, 8192},
	{"zero_range-unaligned", FALLOC_FL_ZERO_RANGE, 100, 5000},
	{"zero_range-extend", FALLOC_FL_ZERO_RANGE, 61440, 16384},
	{"zero_range-keep_size", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 61440, 16384},
	{"collapse_range", FALLOC_FL_COLLAPSE_RANGE, 8192, 8192},
	{"collapse_range-unaligned", FALLOC_FL_COLLAPSE_RANGE, 100, 4096},
	{"insert_range", FALLOC_FL_INSERT_RANGE, 8192, 8192},
	{"unshare_range", FALLOC_FL_UNSHARE_RANGE, 0, 4096},
	{"unknown-flag", 0x8000, 0, 4096},
	{"zero-length", 0, 0, 0},
};

static uint64_t fnv(const unsigned char *p, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 1099511628211ULL;
	return h;
}

static unsigned char buf[4 * SIZE];

/* Size and content hash of the open file fd, read back with pread. */
static int report(int fd, const char *name, const char *result)
{
	struct stat st;
	if (fstat(fd, &st) != 0 || st.st_size > (off_t)sizeof(buf)) {
		fprintf(stderr, "%s: fstat: %s\n", name, strerror(errno));
		return 1;
	}
	size_t got = 0;
	while (got < (size_t)st.st_size) {
		ssize_t r = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
		if (r <= 0) {
			fprintf(stderr, "%s: pread: %s\n", name, r ? strerror(errno) : "EOF");
			return 1;
		}
		got += (size_t)r;
	}
	printf("%s: %s size=%lld fnv=%016llx\n", name, result, (long long)st.st_size,
	       (unsigned long long)fnv(buf, got));
	return 0;
}

/* A fresh file DIR/NAME with the pattern; its descriptor (O_RDWR). */
static int fresh(const char *dir, const char *name)
{
	char path[4096];
	unsigned char pat[SIZE];
	for (size_t i = 0; i < SIZE; i++)
		pat[i] = (unsigned char)(i * 7 + i / 4096 + 1);
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || pwrite(fd, pat, SIZE, 0) != SIZE) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		exit(2);
	}
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: falloc-modes DIR\n");
		return 2;
	}
	int bad = 0;
	int fd = fresh(argv[1], "untouched");
	bad |= report(fd, "untouched", "-");
	close(fd);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct fcase *c = &cases[i];
		fd = fresh(argv[1], c->name);
		const char *result = "ok";
		if (fallocate(fd, c->mode, c->off, c->len) != 0) {
			const char *n = strerrorname_np(errno);
			result = n ? n : "unknown-errno";
		}
		bad |= report(fd, c->name, result);
		close(fd);
	}
	return bad;
}
