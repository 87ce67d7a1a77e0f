/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Block device filter ioctls.
 *
 * Binary compatible with the block device filter interface proposed for
 * upstream Linux (BLKFILTER_ATTACH, BLKFILTER_DETACH and BLKFILTER_CTL):
 * the structures, their padding and the ioctl encodings must never change.
 */
#ifndef _UAPI_LINUX_BLK_FILTER_H
#define _UAPI_LINUX_BLK_FILTER_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Longest filter name, in bytes; shorter names are NUL-terminated. */
#define BLKFILTER_NAME_LENGTH	32

/**
 * struct blkfilter_attach - Argument of the BLKFILTER_ATTACH ioctl.
 * @name:	Name of the filter to attach.
 * @opt:	User space address of filter-specific options, or 0.
 * @optlen:	Size in bytes of the options at @opt.
 */
struct blkfilter_attach {
	__u8 name[BLKFILTER_NAME_LENGTH];
	__u64 opt;
	__u32 optlen;
};

/**
 * struct blkfilter_detach - Argument of the BLKFILTER_DETACH ioctl.
 * @name:	Name of the filter to detach.
 */
struct blkfilter_detach {
	__u8 name[BLKFILTER_NAME_LENGTH];
};

/**
 * struct blkfilter_ctl - Argument of the BLKFILTER_CTL ioctl.
 * @name:	Name of the attached filter the command is meant for.
 * @cmd:	Filter-specific command code.
 * @optlen:	Size in bytes of the buffer at @opt.  The filter may update it.
 * @opt:	User space address of the command's argument buffer.
 */
struct blkfilter_ctl {
	__u8 name[BLKFILTER_NAME_LENGTH];
	__u32 cmd;
	__u32 optlen;
	__u64 opt;
};

/*
 * The ioctls are issued on the block device (whole disk or partition) itself
 * and need CAP_SYS_ADMIN.  Errors: ENOENT for an unknown filter (attach) or
 * when no filter is attached (detach, ctl); EALREADY when the same filter is
 * already attached; EBUSY when another filter is attached; EINVAL when the
 * name does not match the attached filter; EFAULT for a bad argument address.
 */
#define BLKFILTER_ATTACH	_IOWR(0x12, 142, struct blkfilter_attach)
#define BLKFILTER_DETACH	_IOWR(0x12, 143, struct blkfilter_detach)
#define BLKFILTER_CTL		_IOWR(0x12, 144, struct blkfilter_ctl)

#endif /* _UAPI_LINUX_BLK_FILTER_H */
